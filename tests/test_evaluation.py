"""MusicEvaluator (seed 001's CLAP similarity and emotion accuracy) and the mel SSIM of the sweeps."""

import math

import pytest
import torch

from rlmusic_pl.evaluation import MusicEvaluator
from rlmusic_pl.rewards import CLAPReward, EmotionReward, SpectralCentroidReward
from rlmusic_pl.rewards.stability import mel_ssim

SR = 16000


class FixedEmotion(EmotionReward):
    """An emotion 'classifier' whose prediction for clip i is ``predictions[i]`` of the current batch."""

    def __init__(self) -> None:
        super().__init__(n_channels=4)
        self.predictions: list[int] = []

    def probabilities(self, waveforms, sample_rate):
        return torch.nn.functional.one_hot(torch.tensor(self.predictions), 4).float()


@pytest.fixture(scope="module")
def clap():
    return CLAPReward(model="tiny")


def noise(batch: int, seconds: float = 0.5, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=torch.Generator().manual_seed(seed))


def test_clap_similarity_is_the_mean_over_all_batches(clap):
    evaluator = MusicEvaluator(clap=clap)
    waves, prompts = noise(3), ["a happy piano", "a sad piano", "drums"]
    evaluator.update(waves[:2], SR, prompts[:2], [{}, {}])
    evaluator.update(waves[2:], SR, prompts[2:], [{}])
    expected = clap(waves, SR, prompts, [{}] * 3).mean()
    assert evaluator.compute() == {"clap_similarity": pytest.approx(expected.item(), abs=1e-6)}
    evaluator.reset()
    assert evaluator.compute() == {}


def test_emotion_accuracy_per_class_and_overall_skips_prompts_without_emotion():
    emotion = FixedEmotion()
    evaluator = MusicEvaluator(emotion=emotion)
    # targets: happy, happy, sad, (none), angry; predictions: happy, sad, sad, -, happy
    attributes = [{"emotion": "happy"}, {"emotion": "Q1"}, {"emotion": "sad"}, {}, {"emotion": "angry"}]
    emotion.predictions = [0, 2, 2, 0]  # the classifier only sees the four clips with an emotion
    evaluator.update(noise(5), SR, ["p"] * 5, attributes)
    results = {k: v.item() for k, v in evaluator.compute().items()}
    assert results == pytest.approx({
        "emotion_accuracy": 2 / 4, "emotion_accuracy/happy": 1 / 2, "emotion_accuracy/sad": 1.0, "emotion_accuracy/angry": 0.0,
    })
    assert "emotion_accuracy/tender" not in results  # no tender prompt: no accuracy, not a misleading 0


def test_from_rewards_shares_the_clap_and_emotion_rewards(clap):
    emotion = EmotionReward(n_channels=4, mode="probability")
    evaluator = MusicEvaluator.from_rewards([SpectralCentroidReward(), clap, emotion])
    assert evaluator.clap is clap and evaluator.emotion is emotion
    assert MusicEvaluator.from_rewards([SpectralCentroidReward()]).compute() == {}


def test_emotion_probability_mode_is_the_target_class_probability():
    reward = EmotionReward(n_channels=4, mode="probability")
    waves = noise(2, seconds=1.0)
    probabilities = reward.probabilities(waves, SR)
    values = reward(waves, SR, ["p", "q"], [{"emotion": "sad"}, {"emotion": "tender"}])
    assert torch.allclose(values, probabilities[[0, 1], [2, 3]])


def test_mel_ssim_is_one_for_identical_clips_and_lower_for_different_ones():
    a, b = noise(2, seed=1), noise(2, seed=2)
    assert torch.allclose(mel_ssim(a, a, SR), torch.ones(2), atol=1e-5)
    different = mel_ssim(a, b, SR)
    assert different.shape == (2,) and (different < 0.9).all() and all(math.isfinite(v) for v in different.tolist())
    # quieter by 20 dB: the shared normalisation keeps the loudness difference visible
    assert (mel_ssim(a * 0.1, a, SR) < 0.99).all()
    with pytest.raises(ValueError, match="differ in shape"):
        mel_ssim(a, b[:, :100], SR)
