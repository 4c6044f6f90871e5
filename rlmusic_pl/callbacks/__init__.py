"""Callbacks that log what the modules return as ``outputs["samples"]``."""

from rlmusic_pl.callbacks.audio_logging import AudioLogger
from rlmusic_pl.callbacks.prediction_writer import SweepWriter
from rlmusic_pl.callbacks.reward_kl import RewardKLPlot
from rlmusic_pl.callbacks.reward_logging import RewardLogger
from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.callbacks.sweep_clips import Clip, SweepClips

__all__ = ["AudioLogger", "RewardKLPlot", "RewardLogger", "SampleBatch", "SweepWriter", "Clip", "SweepClips"]
