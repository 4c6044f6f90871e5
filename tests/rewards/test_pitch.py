import math

import pytest
import torch

from rlmusic_pl.data.synthetic import NoteLabel, labelled_notes, render_note
from rlmusic_pl.rewards import PitchClassReward, RewardError
from rlmusic_pl.rewards.pitch import chroma, estimate_pitch_class

SR = 16000


@pytest.mark.parametrize("sample_rate", [16000, 32000])
def test_estimator_recovers_the_pitch_class_of_synthesised_notes(sample_rate):
    waves, labels = labelled_notes(48, 0.5, seed=3, sample_rate=sample_rate, octaves=(2, 3, 4, 5), tempos=(None, 120.0))
    truth = torch.tensor([label.pitch_class for label in labels])
    assert (estimate_pitch_class(waves, sample_rate) == truth).all()


def test_pure_sines_land_on_their_pitch_class():
    t = torch.arange(SR) / SR
    midi = torch.tensor([57, 60, 64, 67, 70])  # A3 C4 E4 G4 A#4
    waves = torch.stack([0.5 * torch.sin(2 * math.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midi.tolist()])
    assert estimate_pitch_class(waves, SR).tolist() == (midi % 12).tolist()


def test_chroma_is_a_distribution_and_flat_for_noise_and_silence():
    noise = torch.randn(4, SR, generator=torch.Generator().manual_seed(0)) * 0.1
    shares = chroma(torch.cat([noise, torch.zeros(1, SR)]), SR)
    assert shares.shape == (5, 12)
    assert torch.allclose(shares.sum(1), torch.ones(5))
    assert shares.max() < 0.15  # no class stands out (uniform: 1/12)
    assert torch.allclose(shares[-1], torch.full((12,), 1 / 12))


def test_reward_is_the_target_share_and_hard_mode_is_accuracy():
    wave = render_note(NoteLabel(pitch_class=0, octave=4), 0.5)
    waves = torch.stack([wave, wave, wave])
    prompts = ["a bright C note", "same, named Bb", "same, by number"]
    attributes = [{"pitch_class": "C"}, {"pitch_class": "Bb"}, {"pitch_class": "0"}]
    soft = PitchClassReward().evaluate(waves, SR, prompts, attributes).total
    assert soft[0] > 0.5 and soft[1] < 0.2 and soft[2] == soft[0]
    hard = PitchClassReward(hard=True).evaluate(waves, SR, prompts, attributes).total
    assert hard.tolist() == [1.0, 0.0, 1.0]


def test_reward_rejects_prompts_without_a_valid_pitch_class():
    reward = PitchClassReward()
    with pytest.raises(RewardError, match="needs the prompt attribute"):
        reward.check_prompts(["a note"], [{"brightness": "bright"}])
    with pytest.raises(RewardError, match="'H'.*expected one of C, C#"):
        reward.check_prompts(["a note"], [{"pitch_class": "H"}])
    with pytest.raises(RewardError, match="needs the prompt attribute"):
        reward.evaluate(torch.zeros(1, SR), SR, ["a note"], [{}])
