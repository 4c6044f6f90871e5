"""LightningModules: DDPO, Stage-1 slider and Stage-2 PPO scale layers."""

from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError
from rlmusic_pl.modules.ddpo import DDPOModule
from rlmusic_pl.modules.scale_ppo import GainSchedule, ScalePPOModule, load_gain_schedule
from rlmusic_pl.modules.sweep import SweepError, SweepModule
from rlmusic_pl.modules.slider import AttributeProbe, SliderModule, generate_at_strengths

__all__ = ["AudioLDM2Module", "CheckpointError", "DDPOModule", "AttributeProbe", "SliderModule", "generate_at_strengths", "SweepError", "SweepModule", "GainSchedule", "ScalePPOModule", "load_gain_schedule"]
