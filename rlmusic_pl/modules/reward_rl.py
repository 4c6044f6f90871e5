"""What the modules that learn from rewards of their own samples share (DDPO on AudioLDM2, MusicRL on MusicGen).

The reward plumbing (``RewardScoring``: a reward to optimise, monitor rewards logged beside it, prompts
checked for the attributes the rewards read), advantages from statistics over every rank's prompts and rewards,
seeded generators that a resumed run draws again, and the manual-optimisation step under DDP
(gradients averaged over ranks, then clipped). The modules keep their own sampling and losses.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rlmusic_pl.modules.advantages import PerPromptStatTracker, batch_advantages, group_advantages, leave_one_out_advantages
from rlmusic_pl.modules.reward_scoring import RewardScoring
from rlmusic_pl.rewards.base import Reward

AdvantageMethod = Literal["per_prompt", "group", "rloo", "batch"]


class RewardRL(RewardScoring):
    """Mixin for a LightningModule trained by manual optimisation on rewards of its own samples.

    The module calls ``init_rewards`` in its ``__init__`` and ``check_rewards_at_setup`` in its
    ``setup``; its hyperparameters include ``seed`` and ``max_grad_norm``; it lists the parameters
    it trains in its optimizer (one param group per set of parameters clipped together).
    """

    def init_rewards(self, reward: Reward, monitor_rewards: list[Reward] | None, owner: str,
                     stat_buffer_size: int, stat_min_count: int) -> None:
        """Wrap the rewards (plain functions become ``CallableReward``) and create the per-prompt statistics."""
        self.init_scoring(reward, monitor_rewards, owner)
        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self.epochs_sampled = 0

    def advantages_from_rewards(self, prompts: list[str], rewards: Tensor, method: AdvantageMethod, group_size: int) -> Tensor:
        """Advantages of this rank's samples, from statistics over every rank's prompts and rewards.

        ``per_prompt``: normalised by running statistics per prompt (updates ``stat_tracker``);
        ``group``: each consecutive ``group_size`` samples (one prompt) normalised by their own
        mean/std (GRPO); ``rloo``: minus the mean of the rest of the group; ``batch``: normalised by the whole batch.
        """
        everyone, gathered = self.gather(prompts, rewards)
        if method == "per_prompt":
            advantages = self.stat_tracker.update(everyone, gathered)
        elif method == "group":
            advantages = group_advantages(gathered, group_size)
        elif method == "rloo":
            advantages = leave_one_out_advantages(gathered, group_size)
        else:
            advantages = batch_advantages(gathered)
        return self.my_share(advantages, len(prompts))

    def gather(self, prompts: list[str], values: Tensor) -> tuple[list[str], Tensor]:
        """Every rank's prompts and values [B], in rank order (this rank's alone without DDP)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return prompts, values
        gathered: list[list[str] | None] = [None] * self.trainer.world_size
        dist.all_gather_object(gathered, prompts)
        return [p for rank in gathered for p in rank], self.all_gather(values).reshape(-1)

    def my_share(self, values: Tensor, count: int) -> Tensor:
        """This rank's ``count`` rows of values gathered from every rank."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return values[rank * count : (rank + 1) * count].to(self.device)

    # --------------------------------------------------------------------------- randomness
    def seeded_generator(self, purpose: Literal["sample", "train"]) -> torch.Generator:
        """A generator determined by (seed, epochs sampled, rank, purpose), so resuming repeats the draws."""
        offset = {"sample": 0, "train": 1}[purpose]
        seed = self.hparams.seed + 1_000_003 * self.epochs_sampled + 7_919 * self.global_rank + 104_729 * offset
        return torch.Generator(device=self.device if purpose == "sample" else "cpu").manual_seed(seed)

    # --------------------------------------------------------------------------- manual optimisation
    def no_gradient_sync(self):
        """Backward passes without DDP's all-reduce (``on_before_optimizer_step`` averages once per step)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients arrive here unscaled (under 16-mixed); backward passes ran without DDP's sync.
        for group in optimizer.param_groups:
            params = group["params"]
            if self.trainer.world_size > 1:
                for param in params:
                    if param.grad is not None:
                        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                        param.grad /= self.trainer.world_size
            if self.hparams.max_grad_norm > 0:
                # Each group on its own: a value head's gradients must not shrink the policy's.
                torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm)
