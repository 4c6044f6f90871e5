"""Rewards: batched torch callables from generated audio (and its prompts) to one score per sample."""

from rlmusic_pl.rewards.aesthetics import AestheticsReward
from rlmusic_pl.rewards.base import CallableReward, Reward, RewardError, RewardResult
from rlmusic_pl.rewards.clap import CLAPReward
from rlmusic_pl.rewards.combined import WeightedReward
from rlmusic_pl.rewards.emotion import EmotionReward
from rlmusic_pl.rewards.encoders import AudioTextEncoder, CLAPEncoder, MelStatisticsEncoder
from rlmusic_pl.rewards.pitch import PitchClassReward
from rlmusic_pl.rewards.preference import PreferenceReward
from rlmusic_pl.rewards.simple import BandEnergyReward, LoudnessReward, SpectralCentroidReward, SpectralFluxReward
from rlmusic_pl.rewards.stability import (
    AttributeMonotonicityReward,
    SpectralStabilityReward,
    StrengthSweep,
    SweepReward,
    WeightedSweepReward,
)
from rlmusic_pl.rewards.tempo import TempoReward

__all__ = [
    "AestheticsReward",
    "AudioTextEncoder",
    "BandEnergyReward",
    "CLAPEncoder",
    "CLAPReward",
    "CallableReward",
    "EmotionReward",
    "LoudnessReward",
    "MelStatisticsEncoder",
    "PitchClassReward",
    "PreferenceReward",
    "Reward",
    "RewardError",
    "RewardResult",
    "SpectralCentroidReward",
    "SpectralFluxReward",
    "TempoReward",
    "WeightedReward",
    "AttributeMonotonicityReward",
    "SpectralStabilityReward",
    "StrengthSweep",
    "SweepReward",
    "WeightedSweepReward",
]
