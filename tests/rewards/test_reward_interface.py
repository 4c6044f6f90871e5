"""The Reward interface: plain functions as rewards, and the prompt attributes a reward declares it needs."""

import pytest
import torch

from rlmusic_pl.rewards import CallableReward, Reward, RewardError, SpectralCentroidReward
from rlmusic_pl.rewards.base import as_reward

SR = 16000


def mean_level(waveforms, sample_rate, prompts, attributes):
    return waveforms.abs().mean(dim=1)


class NeedsInstrument(Reward):
    def __init__(self) -> None:
        super().__init__("instrument_match")

    @property
    def required_attributes(self) -> frozenset[str]:
        return frozenset({"instrument"})

    def forward(self, waveforms, sample_rate, prompts, attributes):
        return torch.zeros(waveforms.shape[0])


def test_a_plain_function_becomes_a_reward_named_after_it_with_the_usual_checks():
    reward = as_reward(mean_level, "DDPOModule reward")
    assert isinstance(reward, CallableReward) and reward.name == "mean_level"
    waves = torch.full((2, 800), 0.5)
    assert torch.equal(reward.evaluate(waves, SR, ["a", "b"], [{}, {}]).total, torch.tensor([0.5, 0.5]))
    nan = as_reward(lambda waveforms, *args: torch.full((waveforms.shape[0],), float("nan")), "x")
    with pytest.raises(RewardError, match="'reward' returned NaN"):
        nan.evaluate(waves, SR, ["a", "b"], [{}, {}])
    wrong_shape = CallableReward(lambda waveforms, *args: waveforms, name="raw")
    with pytest.raises(RewardError, match=r"'raw' returned \(2, 800\); expected a tensor of shape \(2,\)"):
        wrong_shape.evaluate(waves, SR, ["a", "b"], [{}, {}])


def test_a_reward_instance_is_kept_and_classes_or_other_values_are_refused_with_advice():
    centroid = SpectralCentroidReward()
    assert as_reward(centroid, "x") is centroid
    with pytest.raises(RewardError, match=r"DDPOModule reward: got the class SpectralCentroidReward.*SpectralCentroidReward\(\)"):
        as_reward(SpectralCentroidReward, "DDPOModule reward")
    with pytest.raises(RewardError, match="expected a Reward or a function .* got 'clap'"):
        as_reward("clap", "DDPOModule reward")


def test_check_prompts_names_the_reward_the_attribute_and_the_prompt():
    reward = NeedsInstrument()
    reward.check_prompts(["a piano"], [{"instrument": "piano"}])
    expected = r"'instrument_match' needs the prompt attribute\(s\) \['instrument'\], but prompt 'drums' has only \['emotion'\]"
    with pytest.raises(RewardError, match=expected):
        reward.check_prompts(["a piano", "drums"], [{"instrument": "piano"}, {"emotion": "sad"}])
    assert SpectralCentroidReward().required_attributes == frozenset()
