import math

import pytest
import torch

from rlmusic_pl.rewards import BandEnergyReward, LoudnessReward, SpectralCentroidReward

SR = 16000


def sines(freqs, amplitudes=None, seconds=0.5):
    t = torch.arange(int(SR * seconds)) / SR
    amplitudes = amplitudes or [0.5] * len(freqs)
    return torch.stack([a * torch.sin(2 * math.pi * f * t) for f, a in zip(freqs, amplitudes)])


def score(reward, waveforms):
    batch = waveforms.shape[0]
    return reward.evaluate(waveforms, SR, ["p"] * batch, [{}] * batch).total


def test_loudness_is_rms_in_db_and_grows_with_amplitude():
    values = score(LoudnessReward(), sines([440] * 4, [0.01, 0.1, 0.5, 1.0]))
    assert (values.diff() > 0).all()
    assert values[-1] == pytest.approx(-3.01, abs=0.05)  # a full-scale sine has RMS 1/sqrt(2)
    assert values[1] - values[0] == pytest.approx(20.0, abs=0.05)  # 10x amplitude = +20 dB


def test_loudness_target_rewards_closeness():
    # A sine of amplitude 0.1*sqrt(2) has RMS 0.1 = -20 dB.
    values = score(LoudnessReward(target_db=-20.0), sines([440] * 3, [0.01, 0.1 * math.sqrt(2), 1.0]))
    assert values[1] == pytest.approx(0.0, abs=0.05)
    assert values[1] > values[0] and values[1] > values[2]
    assert (values <= 0).all()


def test_loudness_of_silence_is_finite():
    assert torch.isfinite(score(LoudnessReward(), torch.zeros(2, 800))).all()


def test_centroid_is_the_sine_frequency_and_higher_for_higher_pitch():
    freqs = [250, 1000, 4000]
    hz = score(SpectralCentroidReward(normalize=False), sines(freqs))
    assert (hz.diff() > 0).all()
    assert hz.tolist() == pytest.approx(freqs, rel=0.1)  # window leakage widens low sines a little
    normalized = score(SpectralCentroidReward(), sines(freqs))
    assert normalized.tolist() == pytest.approx([f / (SR / 2) for f in freqs], rel=0.1)


def test_centroid_target_prefers_the_closest_pitch():
    values = score(SpectralCentroidReward(normalize=False, target=1000.0), sines([250, 1100, 4000]))
    assert values.argmax() == 1


def test_centroid_handles_silence_and_clips_shorter_than_a_window():
    assert torch.isfinite(score(SpectralCentroidReward(), torch.zeros(1, 100))).all()
    assert torch.isfinite(score(SpectralCentroidReward(), sines([1000], seconds=0.01))).all()


def test_band_energy_is_the_fraction_inside_the_band():
    reward = BandEnergyReward(low_hz=100.0, high_hz=500.0)
    inside, outside = score(reward, sines([300, 3000])).tolist()
    assert inside > 0.95 and outside < 0.05
    mixed = score(reward, sines([300], [0.5]) + sines([3000], [0.5]))
    assert mixed.item() == pytest.approx(0.5, abs=0.05)


def test_band_energy_rejects_an_empty_band():
    with pytest.raises(ValueError, match="low_hz"):
        BandEnergyReward(low_hz=500.0, high_hz=100.0)


def test_spectral_flux_is_higher_for_changing_audio_than_for_a_steady_tone():
    from rlmusic_pl.rewards import SpectralFluxReward

    t = torch.arange(16000) / 16000
    steady = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    changing = 0.5 * torch.sin(2 * torch.pi * 440 * t) * (torch.sin(2 * torch.pi * 8 * t) > 0).float()  # 8 Hz gating
    values = SpectralFluxReward()(torch.stack([steady, changing]), 16000, ["a", "b"], [{}, {}])
    assert values[1] > 2 * values[0]
    on_target = SpectralFluxReward(target=values[0].item())(torch.stack([steady, changing]), 16000, ["a", "b"], [{}, {}])
    assert on_target[0] == pytest.approx(0.0, abs=1e-6) and on_target[1] < 0


def test_a_clip_too_short_for_one_mel_frame_is_a_clear_error():
    from rlmusic_pl.rewards import RewardError, SpectralFluxReward

    with pytest.raises(RewardError, match="too short"):
        SpectralFluxReward().evaluate(torch.zeros(1, 100), 16000, ["a"], [{}])
