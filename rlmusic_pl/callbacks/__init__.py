"""Callbacks that log what the modules return as ``outputs["samples"]``."""

from rlmusic_pl.callbacks.audio_logging import AudioLogger
from rlmusic_pl.callbacks.reward_logging import RewardLogger
from rlmusic_pl.callbacks.samples import SampleBatch

__all__ = ["AudioLogger", "RewardLogger", "SampleBatch"]
