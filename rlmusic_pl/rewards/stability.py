"""Rewards of a whole strength sweep (Stage 2, DESIGN.md §7): how smoothly a slider moves a clip.

A per-clip ``Reward`` cannot judge an intermediate strength: it needs the clips of the same prompt
and noise at the other strengths. A ``SweepReward`` therefore scores a ``StrengthSweep`` (the clips
of B rollouts, each generated from one noise at the same G strengths) with one value per rollout:

- ``SpectralStabilityReward``: the SSIM of each intermediate clip's log-mel to the strength-0 clip
  should follow ``ssim(0) + (ssim(1) - ssim(0)) * s**beta``; reward ``exp(-(ssim - target)^2 / (2 sigma^2))``
  averaged over the intermediate strengths.
- ``AttributeMonotonicityReward``: an attribute metric (e.g. the Stage-1 slider's ``AttributeProbe``
  score, measured by the caller) should rise evenly with the strength.
- ``WeightedSweepReward``: their weighted sum, each part reported on its own.

``linearity`` gives the figures that the Stage-2 benchmark reports (R² and the largest jump).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from rlmusic_pl.data.audio import AUDIOLDM_MEL, AudioError, check_waveforms, log_mel, resample
from rlmusic_pl.rewards.base import RewardError, RewardResult, check_reward_values
from rlmusic_pl.rewards.combined import weights_by_name

EPS = 1e-8


# ------------------------------------------------------------------------------ mel SSIM
def normalized_log_mels(waveforms: Tensor, reference: Tensor, sample_rate: int) -> tuple[Tensor, Tensor]:
    """AudioLDM log-mels [B, 1, n_mels, frames] of both clips, scaled together per pair into [0, 1].

    Each pair shares one affine map, so a clip that is louder than its reference stays brighter.
    """
    mels = [log_mel(resample(w.float(), sample_rate, AUDIOLDM_MEL.sample_rate), AUDIOLDM_MEL).transpose(1, 2).unsqueeze(1) for w in (waveforms, reference)]
    low = torch.minimum(mels[0].amin(dim=(1, 2, 3)), mels[1].amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    high = torch.maximum(mels[0].amax(dim=(1, 2, 3)), mels[1].amax(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    scale = (high - low).clamp(min=1e-8)
    return (mels[0] - low) / scale, (mels[1] - low) / scale


def mel_ssim(waveforms: Tensor, reference: Tensor, sample_rate: int) -> Tensor:
    """SSIM [B] between the log-mels of ``waveforms`` [B, T] and ``reference`` [B, T] (1 = identical)."""
    if waveforms.shape != reference.shape:
        raise ValueError(f"mel_ssim: clips {tuple(waveforms.shape)} and references {tuple(reference.shape)} differ in shape")
    mels, reference_mels = normalized_log_mels(waveforms, reference, sample_rate)
    return structural_similarity_index_measure(mels, reference_mels, data_range=1.0, reduction="none").float()


# ------------------------------------------------------------------------------ the sweep
@dataclass
class StrengthSweep:
    """The clips of B rollouts at G strengths; rollout b's clips all start from the same noise.

    Attributes:
        waveforms: [G, B, T], strength-major.
        strengths: [G], strictly increasing, with 0 first and 1 last.
        sample_rate: of the waveforms.
        attribute: [G, B] an attribute metric of every clip (higher = more of the attribute), or None.
    """

    waveforms: Tensor
    strengths: Tensor
    sample_rate: int
    attribute: Tensor | None = None

    def check(self, reward: str) -> None:
        """RewardError naming ``reward`` unless the shapes agree and the strengths run from 0 to 1."""
        if self.waveforms.dim() != 3 or self.strengths.shape != self.waveforms.shape[:1]:
            raise RewardError(f"sweep reward {reward!r}: waveforms must be [G, B, T] and strengths [G], "
                              f"got {tuple(self.waveforms.shape)} and {tuple(self.strengths.shape)}")
        try:
            check_waveforms(self.waveforms.flatten(0, 1), name=f"sweep reward {reward!r}: waveforms")
        except AudioError as err:
            raise RewardError(str(err)) from err
        s = self.strengths
        if s.numel() < 3 or s[0] != 0 or s[-1] != 1 or not (s.diff() > 0).all():
            raise RewardError(f"sweep reward {reward!r}: strengths must increase from 0 to 1 with at least one between, got {s.tolist()}")
        if self.attribute is not None and self.attribute.shape != self.waveforms.shape[:2]:
            raise RewardError(f"sweep reward {reward!r}: attribute must be [G, B] = {tuple(self.waveforms.shape[:2])}, got {tuple(self.attribute.shape)}")


class SweepReward(nn.Module):
    """Base class of rewards over a ``StrengthSweep``: one value per rollout [B].

    Subclasses implement ``forward``; callers use ``evaluate``, which checks the sweep and every
    output component (the same contract as ``Reward.evaluate``).

    Args:
        name: the name under which this reward is reported and logged.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, sweep: StrengthSweep) -> Tensor:
        raise NotImplementedError

    def components(self, sweep: StrengthSweep) -> dict[str, Tensor]:
        return {self.name: self(sweep)}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        return components[self.name]

    @torch.no_grad()
    def evaluate(self, sweep: StrengthSweep) -> RewardResult:
        sweep.check(self.name)
        rollouts = sweep.waveforms.shape[1]
        components = self.components(sweep)
        for name, values in components.items():
            check_reward_values(name, values, rollouts)
        total = self.combine(components)
        check_reward_values(self.name, total, rollouts)
        return RewardResult(total=total.float(), components={k: v.float() for k, v in components.items()})


class SpectralStabilityReward(SweepReward):
    """Intermediate clips should move away from the strength-0 clip along ``s**beta`` (in mel SSIM).

    ``ssim(s)`` is the SSIM of the clip at strength s to the clip at 0 (so ``ssim(0) = 1``); the target
    is ``ssim(0) + (ssim(1) - ssim(0)) * s**beta`` and each intermediate strength scores
    ``exp(-(ssim(s) - target(s))^2 / (2 sigma^2))``; the reward is their mean (1 = on the curve).

    With ``relative`` the SSIM drop is measured as a fraction of the rollout's own total drop,
    ``(ssim(0) - ssim(s)) / (ssim(0) - ssim(1))``, against the target ``s**beta``: a slider that
    changes a clip little (SSIM 0.999 at s = 1, as on the tiny backbones) otherwise scores ~1 at any
    spacing of its steps, and the reward carries no signal.

    Args:
        beta: exponent of the target curve (1: SSIM falls linearly with the strength).
        sigma: tolerance of the Gaussian score, in SSIM units (``relative``: in fractions of the drop).
        relative: score the fraction of each rollout's own SSIM drop instead of the SSIM itself.
        name: the name under which the reward is logged.
    """

    def __init__(self, beta: float = 1.0, sigma: float = 0.1, relative: bool = False, name: str = "stability") -> None:
        super().__init__(name)
        if beta <= 0 or sigma <= 0:
            raise ValueError(f"SpectralStabilityReward: beta and sigma must be > 0, got beta={beta}, sigma={sigma}")
        self.beta = beta
        self.sigma = sigma
        self.relative = relative

    def ssim_to_strength0(self, sweep: StrengthSweep) -> Tensor:
        """SSIM [G, B] of every clip's mel to its rollout's strength-0 clip."""
        groups, rollouts, _ = sweep.waveforms.shape
        reference = sweep.waveforms[0].repeat(groups, 1)
        return mel_ssim(sweep.waveforms.flatten(0, 1), reference, sweep.sample_rate).view(groups, rollouts)

    def forward(self, sweep: StrengthSweep) -> Tensor:
        ssim = self.ssim_to_strength0(sweep)
        curve = sweep.strengths.to(ssim).view(-1, 1).pow(self.beta)
        if self.relative:
            # A rollout whose clip does not change has no drop: the clamp keeps its fractions at 0, off the
            # curve, so a slider that does nothing scores low instead of dividing by zero.
            drop = (ssim[:1] - ssim) / (ssim[:1] - ssim[-1:]).clamp(min=EPS)
            score = torch.exp(-(drop - curve).pow(2) / (2 * self.sigma**2))
        else:
            target = ssim[:1] + (ssim[-1:] - ssim[:1]) * curve
            score = torch.exp(-(ssim - target).pow(2) / (2 * self.sigma**2))
        return score[1:-1].mean(0)


class AttributeMonotonicityReward(SweepReward):
    """The attribute should rise evenly with the strength: ``1 - sum|d - d*| / sum|d|``, in [-1, 1].

    ``d`` are the attribute's steps between neighbouring strengths and ``d*`` the steps of an even
    rise over the same total (``|a(1) - a(0)|`` shared in proportion to the strength steps): 1 for an
    exactly linear rise, lower for uneven steps, -1 when it falls all the way. The measure is scale
    free (a weaker slider that rises evenly scores as well as a stronger one); Stage 2's gain penalty
    keeps the slider's strength. Needs ``sweep.attribute``.

    Args:
        name: the name under which the reward is logged.
    """

    def __init__(self, name: str = "monotonicity") -> None:
        super().__init__(name)

    def forward(self, sweep: StrengthSweep) -> Tensor:
        if sweep.attribute is None:
            raise RewardError(f"sweep reward {self.name!r} needs the attribute of every clip (StrengthSweep.attribute)")
        steps = sweep.attribute.float().diff(dim=0)  # [G - 1, B]
        share = sweep.strengths.to(steps).diff() / (sweep.strengths[-1] - sweep.strengths[0])
        even = steps.sum(0).abs() * share.view(-1, 1)
        return 1 - (steps - even).abs().sum(0) / (steps.abs().sum(0) + EPS)


class WeightedSweepReward(SweepReward):
    """Total = sum of weight * each named sweep reward; every sub-reward is also reported on its own.

    Args:
        rewards: the sweep rewards by the name used for logging.
        weights: weight per reward name; rewards not named here get 1.0.
        name: the name under which the total is logged.
    """

    def __init__(self, rewards: dict[str, SweepReward], weights: dict[str, float] | None = None, name: str = "total") -> None:
        super().__init__(name)
        self.weights = weights_by_name(type(self).__name__, rewards, weights)
        self.rewards = nn.ModuleDict(rewards)

    def forward(self, sweep: StrengthSweep) -> Tensor:
        return self.combine(self.components(sweep))

    def components(self, sweep: StrengthSweep) -> dict[str, Tensor]:
        return {key: reward.combine(reward.components(sweep)) for key, reward in self.rewards.items()}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        return sum(weight * components[key] for key, weight in self.weights.items())


# ------------------------------------------------------------------------------ measurement
def linearity(attribute: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """How linearly an attribute [G, B] follows the strengths [G], per rollout [B].

    Returns:
        r2: coefficient of determination of the least-squares line through (strength, attribute).
        max_jump: the largest |step| between neighbouring strengths over the full range |a(1) - a(0)|
            (1 / (G - 1) for an even rise on an evenly spaced grid; larger = a jump).
    """
    a = attribute.double()
    s = strengths.to(a).view(-1, 1)
    s_centred, a_centred = s - s.mean(), a - a.mean(0)
    slope = (s_centred * a_centred).sum(0) / s_centred.pow(2).sum()
    residual = (a_centred - slope * s_centred).pow(2).sum(0)
    r2 = 1 - residual / a_centred.pow(2).sum(0).clamp(min=EPS)
    max_jump = a.diff(dim=0).abs().amax(0) / (a[-1] - a[0]).abs().clamp(min=EPS)
    return r2.float(), max_jump.float()
