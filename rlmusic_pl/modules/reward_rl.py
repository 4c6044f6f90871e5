"""What the modules that learn from rewards of their own samples share (DDPO on AudioLDM2, MusicRL on MusicGen).

The reward plumbing (a reward to optimise, monitor rewards logged beside it, prompts checked for the
attributes the rewards read), advantages from statistics over every rank's prompts and rewards,
seeded generators that a resumed run draws again, and the manual-optimisation step under DDP
(gradients averaged over ranks, then clipped). The modules keep their own sampling and losses.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.modules.advantages import PerPromptStatTracker, batch_advantages, group_advantages, leave_one_out_advantages
from rlmusic_pl.rewards.base import Reward, RewardResult, as_reward, as_rewards, check_rewards_for_prompts

AdvantageMethod = Literal["per_prompt", "group", "rloo", "batch"]


class RewardRL:
    """Mixin for a LightningModule trained by manual optimisation on rewards of its own samples.

    The module calls ``init_rewards`` in its ``__init__`` and ``check_rewards_at_setup`` in its
    ``setup``; its hyperparameters include ``seed`` and ``max_grad_norm``; it lists the parameters
    it trains in its optimizer (one param group per set of parameters clipped together).
    """

    def init_rewards(self, reward: Reward, monitor_rewards: list[Reward] | None, owner: str,
                     stat_buffer_size: int, stat_min_count: int) -> None:
        """Wrap the rewards (plain functions become ``CallableReward``) and create the per-prompt statistics."""
        self.reward = as_reward(reward, f"{owner} reward")
        self.monitor_rewards = nn.ModuleList(as_rewards(monitor_rewards, f"{owner} monitor_rewards"))
        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self.epochs_sampled = 0

    def check_rewards_at_setup(self, stage: str) -> None:
        """Before the backbone loads: every prompt the rewards will score has the attributes they read."""
        splits = {"fit": ["train", "val"] if self.trainer.limit_val_batches else ["train"], "validate": ["val"], "test": ["test"]}
        check_rewards_for_prompts([self.reward, *self.monitor_rewards], self.trainer.datamodule, splits.get(stage, []))

    # --------------------------------------------------------------------------- rewards
    def score(self, waveforms: Tensor, prompts: list[str], attributes: list[dict[str, str]]) -> RewardResult:
        """The reward, with monitor rewards' components added under ``monitor/<name>``."""
        sample_rate = self.backbone.sample_rate
        result = self.reward.evaluate(waveforms, sample_rate, prompts, attributes)
        components = {"total": result.total, **{k: v for k, v in result.components.items() if k != "total"}}
        for monitor in self.monitor_rewards:
            monitored = monitor.evaluate(waveforms, sample_rate, prompts, attributes)
            components.update({f"monitor/{k}": v for k, v in monitored.components.items()})
        return RewardResult(total=result.total, components=components)

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

    def log_rewards(self, stage: str, rewards: RewardResult) -> None:
        for name, values in rewards.components.items():
            on_step = stage == "train"
            self.log(f"{stage}/reward/{name}", values.mean(), on_step=on_step, on_epoch=not on_step, sync_dist=not on_step,
                     batch_size=values.numel(), prog_bar=name == "total")

    def sample_batch(self, waveforms: Tensor, prompts: list[str], attributes: list[dict[str, str]], rewards: RewardResult) -> SampleBatch:
        """What the shared callbacks (``RewardLogger``, ``AudioLogger``) read from ``outputs["samples"]``."""
        return SampleBatch(
            waveforms=waveforms.detach().cpu(),
            sample_rate=self.backbone.sample_rate,
            prompts=prompts,
            attributes=attributes,
            rewards={k: v.detach().cpu() for k, v in rewards.components.items()},
        )

    # --------------------------------------------------------------------------- randomness
    def seeded_generator(self, purpose: Literal["sample", "train"]) -> torch.Generator:
        """A generator determined by (seed, epochs sampled, rank, purpose), so resuming repeats the draws."""
        offset = {"sample": 0, "train": 1}[purpose]
        seed = self.hparams.seed + 1_000_003 * self.epochs_sampled + 7_919 * self.global_rank + 104_729 * offset
        return torch.Generator(device=self.device if purpose == "sample" else "cpu").manual_seed(seed)

    def evaluation_generator(self, batch_idx: int) -> torch.Generator:
        """Fixed noise per evaluation batch: validation curves compare the same draws across epochs."""
        return torch.Generator(device=self.device).manual_seed(self.hparams.seed + 7919 * batch_idx + self.global_rank)

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
