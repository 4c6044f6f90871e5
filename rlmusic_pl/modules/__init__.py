"""LightningModules: DDPO, Diffusion-DPO, Stage-1 slider, Stage-2 PPO scale layers and strength sweeps; the MusicGen base, MusicRL, MusicGen adapter sweeps and MusicRFM steering; the preference reward model."""

from rlmusic_pl.gain_schedule import GainSchedule, load_gain_schedule
from rlmusic_pl.modules.backbone_module import BackboneModule
from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError
from rlmusic_pl.modules.ddpo import DDPOModule
from rlmusic_pl.modules.dpo import DiffusionDPOModule
from rlmusic_pl.modules.musicgen import MusicGenModule
from rlmusic_pl.modules.musicgen_sweep import MusicGenSweepModule
from rlmusic_pl.modules.musicrl import MusicRLModule
from rlmusic_pl.modules.preference import PreferenceRewardModule
from rlmusic_pl.modules.scale_ppo import ScalePPOModule
from rlmusic_pl.modules.slider import AttributeProbe, SliderModule, generate_at_strengths, generate_with_schedule
from rlmusic_pl.modules.steering import SteeringModule
from rlmusic_pl.modules.sweep import SweepError, SweepModule

__all__ = [
    "AttributeProbe",
    "AudioLDM2Module",
    "BackboneModule",
    "CheckpointError",
    "DDPOModule",
    "DiffusionDPOModule",
    "GainSchedule",
    "MusicGenModule",
    "MusicGenSweepModule",
    "MusicRLModule",
    "PreferenceRewardModule",
    "ScalePPOModule",
    "SliderModule",
    "SteeringModule",
    "SweepError",
    "SweepModule",
    "generate_at_strengths",
    "generate_with_schedule",
    "load_gain_schedule",
]
