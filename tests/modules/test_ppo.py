import math

import pytest
import torch

from rlmusic_pl.modules.ppo import clipped_surrogate


def test_clipped_surrogate_matches_hand_computed_values():
    log_prob = torch.tensor([0.0, 0.2, -0.3, 0.05])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    advantages = torch.tensor([1.0, 2.0, -1.0, -3.0])
    eps = 0.1
    terms = clipped_surrogate(log_prob, old, advantages, eps)
    # Written out sample by sample: r = e^dlogp; loss_i = max(-A r, -A clip(r, 0.9, 1.1)).
    r = [1.0, math.exp(0.2), math.exp(-0.3), math.exp(0.05)]
    per_sample = [
        max(-1.0 * r[0], -1.0 * 1.0),  # r inside the range
        max(-2.0 * r[1], -2.0 * 1.1),  # positive advantage, r above 1+eps: clipped term wins
        max(1.0 * r[2], 1.0 * 0.9),  # negative advantage, r below 1-eps: clipped term wins
        max(3.0 * r[3], 3.0 * r[3]),  # inside the range
    ]
    assert terms.loss.item() == pytest.approx(sum(per_sample) / 4, rel=1e-6)
    assert terms.approx_kl.item() == pytest.approx(0.5 * (0.2**2 + 0.3**2 + 0.05**2) / 4, rel=1e-6)
    assert terms.clipfrac.item() == pytest.approx(0.5)


def test_gradient_vanishes_where_the_ratio_is_clipped():
    log_prob = torch.tensor([0.5, 0.0], requires_grad=True)
    terms = clipped_surrogate(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-4)
    terms.loss.backward()
    assert log_prob.grad[0] == 0  # ratio e^0.5 is clipped for a positive advantage
    assert log_prob.grad[1] == pytest.approx(-0.5)  # d/dlogp of -A e^logp / 2 at 0
