import math

import pytest
import torch
from jsonargparse import ArgumentParser

from rlmusic_pl.rewards import EmotionReward, LoudnessReward, Reward, RewardError, SpectralCentroidReward, WeightedReward

SR = 16000


class TwoParts(Reward):
    """A reward made of two components whose total is their difference (not their sum)."""

    def __init__(self, name: str = "two_parts") -> None:
        super().__init__(name)

    def components(self, waveforms, sample_rate, prompts, attributes):
        peak = waveforms.abs().amax(dim=-1)
        return {"peak": peak, "mean": waveforms.mean(dim=-1)}

    def combine(self, components):
        return components["peak"] - 10 * components["mean"]


class NaNReward(Reward):
    def __init__(self, name: str = "nan") -> None:
        super().__init__(name)

    def forward(self, waveforms, sample_rate, prompts, attributes):
        return torch.full((waveforms.shape[0],), float("nan"))


@pytest.fixture
def waveforms():
    t = torch.arange(SR // 2) / SR
    return torch.stack([0.1 * torch.sin(2 * math.pi * 300 * t) + 0.05, 0.8 * torch.sin(2 * math.pi * 3000 * t)])


def evaluate(reward, waveforms):
    return reward.evaluate(waveforms, SR, ["a", "b"], [{}, {}])


def test_total_is_the_weighted_sum_of_sub_rewards(waveforms):
    loud, bright = LoudnessReward(), SpectralCentroidReward()
    result = evaluate(WeightedReward({"loud": loud, "bright": bright}, weights={"bright": 2.5}), waveforms)
    expected_loud, expected_bright = loud(waveforms, SR, [], []), bright(waveforms, SR, [], [])
    assert set(result.components) == {"loud", "bright"}
    torch.testing.assert_close(result.components["loud"], expected_loud)
    torch.testing.assert_close(result.total, expected_loud + 2.5 * expected_bright)


def test_several_components_are_prefixed_and_the_total_uses_the_sub_rewards_own_combine(waveforms):
    two = TwoParts()
    result = evaluate(WeightedReward({"two": two, "loud": LoudnessReward()}, weights={"two": 3.0, "loud": 0.0}), waveforms)
    parts = two.components(waveforms, SR, [], [])
    assert set(result.components) == {"two", "two/peak", "two/mean", "loud"}
    torch.testing.assert_close(result.components["two/peak"], parts["peak"])
    torch.testing.assert_close(result.components["two"], parts["peak"] - 10 * parts["mean"])
    torch.testing.assert_close(result.total, 3.0 * (parts["peak"] - 10 * parts["mean"]))


def test_nested_weighted_rewards(waveforms):
    inner = WeightedReward({"loud": LoudnessReward(), "bright": SpectralCentroidReward()}, name="quality")
    outer = WeightedReward({"quality": inner, "two": TwoParts()}, weights={"quality": 0.5})
    result = evaluate(outer, waveforms)
    assert {"quality", "quality/loud", "quality/bright", "two"} <= set(result.components)
    expected = 0.5 * inner(waveforms, SR, [], []) + result.components["two"]
    torch.testing.assert_close(result.total, expected)


def test_a_bad_sub_reward_is_named(waveforms):
    with pytest.raises(RewardError, match="'broken'"):
        evaluate(WeightedReward({"loud": LoudnessReward(), "broken": NaNReward()}), waveforms)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        WeightedReward({})
    with pytest.raises(ValueError, match=r"unknown rewards \['lodness'\]"):
        WeightedReward({"loudness": LoudnessReward()}, weights={"lodness": 1.0})
    with pytest.raises(ValueError, match=r"no '\.'"):
        WeightedReward({"a.b": LoudnessReward()})


def test_built_from_yaml_with_jsonargparse(waveforms):
    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    config = parser.parse_string(
        """
reward:
  class_path: rlmusic_pl.rewards.WeightedReward
  init_args:
    rewards:
      loud:
        class_path: rlmusic_pl.rewards.LoudnessReward
        init_args:
          target_db: -20.0
      bright:
        class_path: rlmusic_pl.rewards.SpectralCentroidReward
        init_args:
          normalize: false
    weights:
      bright: 0.001
"""
    )
    reward = parser.instantiate(config).reward
    assert isinstance(reward, WeightedReward)
    assert reward.rewards["loud"].target_db == -20.0
    assert reward.weights == {"loud": 1.0, "bright": 0.001}
    expected = LoudnessReward(target_db=-20.0)(waveforms, SR, [], []) + 0.001 * SpectralCentroidReward(normalize=False)(
        waveforms, SR, [], []
    )
    torch.testing.assert_close(evaluate(reward, waveforms).total, expected)


def test_a_plain_function_is_a_component_too(waveforms):
    def level(waveforms, sample_rate, prompts, attributes):
        return waveforms.abs().mean(dim=1)

    result = evaluate(WeightedReward({"level": level, "loud": LoudnessReward()}, {"level": 2.0}), waveforms)
    torch.testing.assert_close(result.components["level"], waveforms.abs().mean(dim=1))
    torch.testing.assert_close(result.total, 2 * result.components["level"] + result.components["loud"])


def test_required_attributes_are_those_of_every_component_and_checks_name_the_component():
    reward = WeightedReward({"emotion": EmotionReward(n_channels=8), "loud": LoudnessReward()})
    assert reward.required_attributes == {"emotion"}
    reward.check_prompts(["a"], [{"emotion": "sad"}])
    with pytest.raises(RewardError, match="reward 'emotion': prompt 'b' has no 'emotion' attribute"):
        reward.check_prompts(["a", "b"], [{"emotion": "sad"}, {}])
