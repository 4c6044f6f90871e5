from rlmusic_pl.rewards.emotion import EmotionReward  # noqa: F401
from rlmusic_pl.rewards.base import Reward, RewardError, RewardResult
from rlmusic_pl.rewards.clap import CLAPReward
from rlmusic_pl.rewards.combined import WeightedReward
from rlmusic_pl.rewards.simple import BandEnergyReward, LoudnessReward, SpectralCentroidReward
