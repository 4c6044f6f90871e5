"""Activation checkpointing per block that works while the frozen backbone stays in eval mode.

The libraries' own switches (diffusers' and transformers' ``gradient_checkpointing``) act only in
training mode, and our frozen backbones always run in eval mode (their dropout would make the policy
stochastic); diffusers' AudioLDM2 switch also passes masks wrongly. So each block's ``forward`` is
wrapped to recompute its activations in the backward pass whenever gradients are being recorded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.utils.checkpoint
from torch import nn


def checkpoint_each(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (less memory, more compute); idempotent."""
    for block in blocks:
        if not getattr(block, "_rl_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._rl_checkpointed = True


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def forward_with_checkpoint(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return forward_with_checkpoint
