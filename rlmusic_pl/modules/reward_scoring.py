"""What the AudioLDM2/MusicGen modules that score generated clips share: a reward, monitor rewards, their logging.

``RewardScoring`` is used by the modules that learn from their own samples' rewards (``RewardRL``:
DDPO, MusicRL) and by those that learn offline and only score validation clips (Diffusion-DPO).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.rewards.base import Reward, RewardResult, as_reward, as_rewards, check_rewards_for_prompts


class RewardScoring:
    """Mixin for a LightningModule that scores its generated clips with a reward (and monitor rewards).

    The module calls ``init_scoring`` in its ``__init__`` and ``check_rewards_at_setup`` in its
    ``setup``; its hyperparameters include ``seed``; ``self.backbone`` has a ``sample_rate``.
    """

    def init_scoring(self, reward: Reward, monitor_rewards: list[Reward] | None, owner: str) -> None:
        """Wrap the rewards (plain functions become ``CallableReward``)."""
        self.reward = as_reward(reward, f"{owner} reward")
        self.monitor_rewards = nn.ModuleList(as_rewards(monitor_rewards, f"{owner} monitor_rewards"))

    def check_rewards_at_setup(self, stage: str) -> None:
        """Before the backbone loads: every prompt the rewards will score has the attributes they read."""
        splits = {"fit": ["train", "val"] if self.trainer.limit_val_batches else ["train"], "validate": ["val"], "test": ["test"]}
        check_rewards_for_prompts([self.reward, *self.monitor_rewards], self.trainer.datamodule, splits.get(stage, []))

    def score(self, waveforms: Tensor, prompts: list[str], attributes: list[dict[str, str]]) -> RewardResult:
        """The reward, with monitor rewards' components added under ``monitor/<name>``."""
        sample_rate = self.backbone.sample_rate
        result = self.reward.evaluate(waveforms, sample_rate, prompts, attributes)
        components = {"total": result.total, **{k: v for k, v in result.components.items() if k != "total"}}
        for monitor in self.monitor_rewards:
            monitored = monitor.evaluate(waveforms, sample_rate, prompts, attributes)
            components.update({f"monitor/{k}": v for k, v in monitored.components.items()})
        return RewardResult(total=result.total, components=components)

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

    def evaluation_generator(self, batch_idx: int) -> torch.Generator:
        """Fixed noise per evaluation batch: validation curves compare the same draws across epochs."""
        return torch.Generator(device=self.device).manual_seed(self.hparams.seed + 7919 * batch_idx + self.global_rank)
