"""The PPO clipped surrogate objective, shared by DDPO (eps 1e-4) and Stage-2 scale training (eps 0.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SurrogateTerms:
    """The clipped loss and the diagnostics PPO implementations log."""

    loss: Tensor
    approx_kl: Tensor
    clipfrac: Tensor


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> SurrogateTerms:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log_prob - old_log_prob)``.

    ``approx_kl`` is ``0.5 mean((log_prob - old_log_prob)^2)``; ``clipfrac`` the fraction of ratios
    outside ``[1 - eps, 1 + eps]``.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return SurrogateTerms(loss=torch.maximum(unclipped, clipped).mean(), approx_kl=approx_kl, clipfrac=clipfrac)
