"""Advantages for policy gradients: per-prompt running statistics, groups (normalised or leave-one-out), whole batch."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

EPS = 1e-6


class PerPromptStatTracker:
    """Normalise rewards by the running mean/std of the same prompt's recent rewards (DDPO).

    Each prompt keeps its last ``buffer_size`` rewards. Until a prompt has ``min_count`` of them,
    its rewards are normalised with the statistics of the whole batch instead.

    Args:
        buffer_size: rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Add this batch's rewards and return their advantages (same order as ``prompts``)."""
        values = rewards.detach().double().cpu().numpy()
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std()
        for prompt in dict.fromkeys(prompts):
            rows = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[rows] = (values[rows] - mean) / (std + EPS)
        return torch.as_tensor(advantages, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the rewards; the configured buffer size and min count stay (a resume may change them)."""
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Normalise each consecutive group of ``group_size`` samples (one prompt, k noises) by its own mean/std."""
    groups = _groups(rewards, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + EPS)).flatten()


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: each reward minus the mean of the other ``group_size - 1`` rewards of its group (unbiased, not rescaled)."""
    if group_size < 2:
        raise ValueError(f"leave-one-out baselines need groups of at least 2 samples, got {group_size}")
    groups = _groups(rewards, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def batch_advantages(rewards: Tensor) -> Tensor:
    """Normalise by the whole batch's mean/std."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)
