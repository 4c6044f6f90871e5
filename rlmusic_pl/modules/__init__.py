"""LightningModules: DDPO, Stage-1 slider and Stage-2 PPO scale layers."""

from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError
from rlmusic_pl.modules.ddpo import DDPOModule

__all__ = ["AudioLDM2Module", "CheckpointError", "DDPOModule"]
