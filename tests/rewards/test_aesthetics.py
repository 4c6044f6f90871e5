"""AestheticsReward: the missing-extra error, the 10 s windowing and the axis mix, with a stand-in predictor."""

import sys

import pytest
import torch
from torch import nn

from rlmusic_pl.errors import MissingExtraError, RLMusicError
from rlmusic_pl.rewards import AestheticsReward, RewardError, WeightedReward

SR = 16_000
MEAN, STD = 5.0, 2.0


class MaskedMeanPredictor(nn.Module):
    """Stands in for AesMultiOutput: each window's normalised PQ is the mean of its audio (padding masked out), CE its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.target_transform = {axis: {"mean": MEAN, "std": STD} for axis in ("PQ", "PC", "CE", "CU")}
        self.inputs = []

    def forward(self, batch: dict) -> dict:
        wav, mask = batch["wav"], batch["mask"]
        self.inputs.append((wav.shape, mask.shape))
        mean = (wav * mask).sum((1, 2)) / mask.sum((1, 2))
        return {"PQ": mean, "PC": 0 * mean, "CE": -mean, "CU": 0 * mean}


def steps(levels: list[float], seconds: list[float]) -> torch.Tensor:
    return torch.cat([torch.full((round(s * SR),), level) for level, s in zip(levels, seconds)])


def evaluate(reward: AestheticsReward, waves: torch.Tensor, sample_rate: int = SR):
    return reward.evaluate(waves, sample_rate, ["a prompt"] * len(waves), [{}] * len(waves))


def test_without_the_package_the_error_names_the_extra(monkeypatch):
    for module in ("audiobox_aesthetics", "audiobox_aesthetics.model", "audiobox_aesthetics.model.aes"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed (even if it is, or was imported)
    with pytest.raises(MissingExtraError, match=r"rlmusic_pl\[aesthetics\]") as caught:
        AestheticsReward()
    assert isinstance(caught.value, RLMusicError) and isinstance(caught.value, ImportError)


def test_windows_are_weighted_by_the_audio_they_hold():
    # 2.5 s in 1 s windows: two full windows at 0.1 and 0.3, a half window at 0.5 (padded, masked, weighted 1/2).
    predictor = MaskedMeanPredictor()
    reward = AestheticsReward(window_seconds=1.0, unit_range=False, predictor=predictor)
    wave = steps([0.1, 0.3, 0.5], [1.0, 1.0, 0.5])
    result = evaluate(reward, torch.stack([wave, -wave]))
    window_mean = (0.1 + 0.3 + 0.5 * 0.5) / 2.5
    torch.testing.assert_close(result.total, torch.tensor([MEAN + STD * window_mean, MEAN - STD * window_mean]))
    assert predictor.inputs == [((6, 1, SR), (6, 1, SR))]  # 2 clips x 3 windows of 1 s, in one call


def test_audio_reaches_the_predictor_at_16_khz():
    predictor = MaskedMeanPredictor()
    reward = AestheticsReward(window_seconds=1.0, predictor=predictor)
    evaluate(reward, torch.zeros(1, 2 * 32_000) + 0.2, sample_rate=32_000)
    assert predictor.inputs == [((2, 1, SR), (2, 1, SR))]


def test_axes_mix_as_a_weighted_mean_on_the_unit_range():
    reward = AestheticsReward(axes={"PQ": 3.0, "CE": 1.0}, window_seconds=1.0, predictor=MaskedMeanPredictor())
    wave = torch.full((1, SR), 0.25)
    result = evaluate(reward, wave)
    pq, ce = (MEAN + STD * 0.25 - 1) / 9, (MEAN - STD * 0.25 - 1) / 9
    assert sorted(result.components) == ["CE", "PQ"]
    torch.testing.assert_close(result.components["PQ"], torch.tensor([pq]))
    torch.testing.assert_close(result.total, torch.tensor([0.75 * pq + 0.25 * ce]))
    # in a MusicRL-R mix each axis is reported under the quality reward's name
    mixed = WeightedReward({"quality": reward}).evaluate(wave, SR, ["a"], [{}])
    assert set(mixed.components) == {"quality", "quality/PQ", "quality/CE"}


@pytest.mark.parametrize("axes", ["XX", {"PQ": 1.0, "loudness": 1.0}, {"PQ": 0.0}, {}])
def test_bad_axes_are_refused(axes):
    with pytest.raises(RewardError, match="axes"):
        AestheticsReward(axes=axes, predictor=MaskedMeanPredictor())


def test_the_real_model_class_scores_with_random_weights():
    aes = pytest.importorskip("audiobox_aesthetics.model.aes")  # CI: pip install --no-deps audiobox-aesthetics
    torch.manual_seed(0)
    model = aes.AesMultiOutput(target_transform={axis: {"mean": 5.0, "std": 1.0} for axis in aes.AXES_NAME})
    reward = AestheticsReward(axes={"PQ": 1.0, "CU": 1.0}, window_seconds=0.5, predictor=model)
    result = evaluate(reward, 0.1 * torch.randn(2, int(0.7 * SR)))
    assert result.total.shape == (2,) and set(result.components) == {"PQ", "CU"}
