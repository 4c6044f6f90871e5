"""Sweep rewards (Stage 2): SSIM target curve, even attribute rise, weighting, input checks, linearity figures."""

import math

import pytest
import torch

from rlmusic_pl.rewards import (
    AttributeMonotonicityReward,
    RewardError,
    SpectralStabilityReward,
    StrengthSweep,
    WeightedSweepReward,
)
from rlmusic_pl.rewards.stability import linearity, mel_ssim

SR = 16000
GRID = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])


def noise_sweep(mix: list[float], rollouts: int = 2) -> StrengthSweep:
    """Clips that move from a tone (s = 0) towards noise by ``mix[g]`` of the way."""
    t = torch.arange(SR // 2) / SR
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t).expand(rollouts, -1)
    noise = 0.5 * torch.randn(rollouts, SR // 2, generator=torch.Generator().manual_seed(0))
    waves = torch.stack([(1 - m) * tone + m * noise for m in mix])
    return StrengthSweep(waves, torch.linspace(0, 1, len(mix)), SR)


def test_stability_scores_each_intermediate_ssim_against_the_target_curve():
    sweep = noise_sweep([0.0, 0.1, 0.3, 0.6, 1.0])
    reward = SpectralStabilityReward(beta=2.0, sigma=0.1)
    ssim = torch.stack([mel_ssim(w, sweep.waveforms[0], SR) for w in sweep.waveforms])  # [G, B]
    target = ssim[0] + (ssim[-1] - ssim[0]) * GRID.view(-1, 1) ** 2.0
    expected = torch.exp(-((ssim - target) ** 2) / (2 * 0.1**2))[1:-1].mean(0)
    result = reward.evaluate(sweep)
    torch.testing.assert_close(result.total, expected, atol=1e-5, rtol=1e-5)
    assert result.total.shape == (2,) and (result.total < 1).all()


def test_stability_is_one_on_the_target_and_lower_off_it():
    sweep = noise_sweep([0.0, 0.3, 0.6, 0.8, 1.0])
    reward = SpectralStabilityReward()
    ssim = reward.ssim_to_strength0(sweep)
    assert (ssim.diff(dim=0) < 0).all()  # more noise: further from the strength-0 clip
    # Clips whose SSIM lies exactly on the target: replace the intermediates by a "perfect" sweep.
    perfect = StrengthSweep(sweep.waveforms[[0, 0, 0, 0, 0]], GRID.clone(), SR)  # ssim(1) = ssim(0) = 1: target 1
    assert torch.allclose(reward.evaluate(perfect).total, torch.ones(2))
    jumpy = noise_sweep([0.0, 0.0, 0.0, 0.0, 1.0])  # nothing, then everything at s = 1
    assert (reward.evaluate(jumpy).total < reward.evaluate(sweep).total).all()


def test_monotonicity_is_one_for_an_even_rise_lower_for_uneven_and_minus_one_for_a_fall():
    reward = AttributeMonotonicityReward()
    attribute = torch.stack([
        2 * GRID - 1,  # even rise
        torch.tensor([0.0, 0.6, 0.8, 0.9, 1.0]),  # concave: most of the change early
        -GRID,  # falls evenly
        torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]),  # rises overall, not monotonic
    ], 1)
    sweep = StrengthSweep(torch.zeros(5, 4, 800), GRID.clone(), SR, attribute)
    values = reward.evaluate(sweep).total
    torch.testing.assert_close(values[[0, 2]], torch.tensor([1.0, -1.0]))
    assert -1 < values[3] < values[1] < 1
    # Concave: steps 0.6, 0.2, 0.1, 0.1 against 0.25 each: 1 - 0.7 / 1.0.
    assert values[1].item() == pytest.approx(0.3, abs=1e-6)


def test_weighted_sweep_reward_reports_each_part_and_the_weighted_total():
    sweep = noise_sweep([0.0, 0.2, 0.5, 0.7, 1.0])
    sweep.attribute = torch.stack([GRID, GRID**2], 1)
    stability, monotonicity = SpectralStabilityReward(), AttributeMonotonicityReward()
    reward = WeightedSweepReward({"stability": stability, "monotonicity": monotonicity}, {"stability": 0.5, "monotonicity": 2.0})
    result = reward.evaluate(sweep)
    assert set(result.components) == {"stability", "monotonicity"}
    torch.testing.assert_close(result.components["stability"], stability.evaluate(sweep).total)
    torch.testing.assert_close(result.total, 0.5 * result.components["stability"] + 2.0 * result.components["monotonicity"])
    with pytest.raises(ValueError, match="unknown rewards"):
        WeightedSweepReward({"stability": stability}, {"stabilty": 1.0})


def test_sweeps_are_checked():
    sweep = noise_sweep([0.0, 0.5, 1.0])
    with pytest.raises(RewardError, match="needs the attribute"):
        AttributeMonotonicityReward().evaluate(sweep)
    with pytest.raises(RewardError, match="increase from 0 to 1"):
        SpectralStabilityReward().evaluate(StrengthSweep(sweep.waveforms, torch.tensor([0.0, 0.5, 0.9]), SR))
    with pytest.raises(RewardError, match=r"attribute must be \[G, B\]"):
        AttributeMonotonicityReward().evaluate(StrengthSweep(sweep.waveforms, sweep.strengths, SR, torch.zeros(3, 5)))
    bad = sweep.waveforms.clone()
    bad[1, 0, 10] = float("nan")
    with pytest.raises(RewardError, match="NaN or inf"):
        SpectralStabilityReward().evaluate(StrengthSweep(bad, sweep.strengths, SR))


def test_linearity_figures():
    attribute = torch.stack([3 * GRID + 1, torch.tensor([0.0, 0.6, 0.8, 0.9, 1.0])], 1)
    r2, max_jump = linearity(attribute, GRID)
    torch.testing.assert_close(r2[0], torch.tensor(1.0))
    torch.testing.assert_close(max_jump, torch.tensor([0.25, 0.6]))
    assert r2[1] < 0.95


def test_relative_stability_scores_the_fraction_of_each_rollouts_own_ssim_drop():
    sweep = noise_sweep([0.0, 0.1, 0.3, 0.6, 1.0])
    reward = SpectralStabilityReward(beta=2.0, sigma=0.1, relative=True)
    ssim = reward.ssim_to_strength0(sweep)
    drop = (ssim[0] - ssim) / (ssim[0] - ssim[-1])
    expected = torch.exp(-((drop - GRID.view(-1, 1) ** 2.0) ** 2) / (2 * 0.1**2))[1:-1].mean(0)
    torch.testing.assert_close(reward.evaluate(sweep).total, expected, atol=1e-5, rtol=1e-5)


def test_relative_stability_is_high_on_the_own_range_curve_and_low_for_jumps_or_no_change():
    relative = SpectralStabilityReward(relative=True)
    mixes = torch.linspace(0, 2e-4, 41)
    fine = noise_sweep(mixes.tolist(), rollouts=1)
    drop = relative.ssim_to_strength0(fine)[:, 0]
    drop = (drop[0] - drop) / (drop[0] - drop[-1])
    # The mixes whose own SSIM drop is closest to 1/4, 1/2, 3/4 of the total: a sweep on the relative curve.
    even_mix = [mixes[(drop - s).abs().argmin()].item() for s in GRID.tolist()]
    even, jumpy = noise_sweep(even_mix), noise_sweep([0.0, 0.0, 0.0, 0.0, 2e-4])
    assert (relative.evaluate(even).total > 0.8).all()
    assert (relative.evaluate(jumpy).total < 0.2).all()
    still = StrengthSweep(even.waveforms[[0, 0, 0, 0, 0]], GRID.clone(), SR)  # no change at all: no signal to reward
    assert (relative.evaluate(still).total < 0.2).all()
