"""The policy-identity check shared by the RL modules' tests: the training pass scores exactly the policy that sampled.

Before any optimizer step, recomputing the log-prob of every sampled action through the training
path must give back the log-prob recorded while sampling: every importance ratio is 1, approx_kl
is 0 and no ratio is clipped. The bugs of the published DDPO code on AudioLDM2 (DESIGN.md §4) break
exactly this and nothing else a test of the code against itself would see: the training pass
swapping the prompt and negative-prompt halves of classifier-free guidance, or conditioning every
row of a training minibatch on its first row's prompt (in ``test_ddpo.py`` on the tiny backbone they
give approx_kl 1.7 and 0.32, where the correct pass gives exactly 0).

To use it for a module (DDPO in ``tests/modules/test_ddpo.py``; MusicRL's autoregressive loop the same way):
  - ``sample()`` runs the module's own sampling loop, with guidance on (scale > 1) so that both CFG
    halves matter, on one batch of at least two distinct prompts and, where the module takes
    negative prompts, two distinct negative prompts, and returns a ``SampledBatch``: the prompts,
    the negatives (None where the unconditional input is the same for every sample, as MusicGen's
    zeroed text states), the log-prob of every action it will train on (DDPO: [samples, steps];
    MusicRL: the sampled tokens, pad positions dropped), and in ``state`` whatever the training
    pass needs (trajectories, tokens, stored conditioning);
  - ``recompute(sampled)`` runs the module's training pass (the code that computes the loss, with
    its minibatching and shuffling, not a copy of it) on ``sampled.state`` before any optimizer step
    and returns the recomputed log-prob of the same actions, in the same layout.
``check_policy_identity(sample, recompute, clip_range)`` then asserts the identity and returns the
surrogate diagnostics. A test using it must be seen to fail with the two bugs above planted in its
training pass (swap the guidance halves; give a minibatch its first row's conditioning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlmusic_pl.modules.ppo import SurrogateTerms, clipped_surrogate


@dataclass
class SampledBatch:
    """What a sampling loop recorded, for ``check_policy_identity``.

    Attributes:
        prompts: the prompt of each sample.
        negative_prompts: the negative prompt of each sample; None if the module has none (the
            unconditional input is the same for every sample).
        log_probs: the log-prob, under the sampling policy, of every action the training pass trains on.
        state: what ``recompute`` needs to run the training pass on these samples.
    """

    prompts: list[str]
    negative_prompts: list[str] | None
    log_probs: Tensor
    state: Any = None


def check_policy_identity(
    sample: Callable[[], SampledBatch], recompute: Callable[[SampledBatch], Tensor], clip_range: float, tolerance: float = 1e-5
) -> SurrogateTerms:
    """Sample a batch, recompute its log-probs through the training pass, and assert the policy is the same.

    Args:
        sample: runs the sampling loop on distinct prompts and negative prompts (see the module docstring).
        recompute: runs the training pass on the sampled batch before any optimizer step; returns
            log-probs shaped like ``sampled.log_probs``.
        clip_range: the module's PPO clip epsilon: no ratio may leave ``[1 - clip_range, 1 + clip_range]``
            (a module that does not clip, such as MusicRL's policy gradient, passes a small one: 1e-4).
        tolerance: largest allowed ``|log ratio|`` (float rounding; the bugs above give more than 1).

    Returns:
        The clipped surrogate's diagnostics of the recomputed log-probs (approx_kl, clipfrac).
    """
    sampled = sample()
    assert len(set(sampled.prompts)) >= 2, f"the batch needs distinct prompts to expose mixed-up conditioning, got {sampled.prompts}"
    assert sampled.negative_prompts is None or len(set(sampled.negative_prompts)) >= 2, (
        f"the batch needs distinct negative prompts to expose mixed-up negative conditioning, got {sampled.negative_prompts}"
    )
    old = sampled.log_probs.detach()
    new = recompute(sampled).detach()
    assert new.shape == old.shape, f"recomputed log-probs have shape {tuple(new.shape)}, sampled ones {tuple(old.shape)}"
    assert torch.isfinite(new).all(), "some sampled actions were not recomputed (or their log-prob is not finite)"
    terms = clipped_surrogate(new, old, torch.ones_like(old), clip_range)
    log_ratio = new - old
    worst = log_ratio.abs().argmax()
    assert log_ratio.abs().max() <= tolerance, (
        f"the training pass does not score the policy that sampled: largest |log ratio| {log_ratio.abs().max():.3g} "
        f"(at flat index {worst.item()}), approx_kl {terms.approx_kl:.3g}, clipfrac {terms.clipfrac:.3g}"
    )
    assert terms.approx_kl <= 0.5 * tolerance**2
    assert terms.clipfrac == 0
    return terms
