"""Reward statistics to the trainer's loggers: mean, std, means per attribute value, histograms."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from rlmusic_pl.callbacks.tensorboard import logging_step, samples_from, tensorboard_writer


class RewardLogger(Callback):
    """Log every reward component of the samples that steps return as ``outputs["samples"]``.

    Tags: ``{stage}/reward/{name}_mean`` and ``_std``, ``{stage}/reward/{name}/{key}={value}`` (the
    mean over samples whose attribute ``key`` is ``value``) and, with a TensorBoard logger, the
    histogram ``{stage}/reward/{name}``. Training logs each step (Lightning writes every
    ``log_every_n_steps``, and so do the histograms); validation and test log once per epoch over
    all their samples.

    Under DDP, means and stds are averaged over ranks (``sync_dist``): exact when the module
    returns gathered samples (the same on every rank), an average of per-rank values otherwise.
    Per-attribute means and histograms are those of rank 0's samples, because ranks may see
    different attribute values and a collective over differing tags would hang.
    Modules must return samples from every rank, or from none.

    Args:
        log_histograms: write reward histograms when the trainer has a TensorBoard logger.
        attribute_keys: attributes to break the rewards down by; None: every key seen.
    """

    def __init__(self, log_histograms: bool = True, attribute_keys: list[str] | None = None) -> None:
        self.log_histograms = log_histograms
        self.attribute_keys = attribute_keys
        self._epoch: dict[str, tuple[list[dict[str, Tensor]], list[dict[str, str]]]] = {}
        self._last_histogram_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        samples = samples_from(outputs)
        if samples is None or trainer.sanity_checking:
            return
        step = logging_step(trainer)
        # The cadence of Lightning's own step logging (it counts from 1).
        every = trainer.log_every_n_steps
        histograms = every > 0 and (step + 1) % every == 0 and step != self._last_histogram_step
        if histograms:
            self._last_histogram_step = step
        self._log(trainer, pl_module, "train", samples.rewards, samples.attributes, per_step=True, histograms=histograms)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch["val"] = ([], [])

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collect("val", trainer, outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch["test"] = ([], [])

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collect("test", trainer, outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch("test", trainer, pl_module)

    def _collect(self, stage: str, trainer: Trainer, outputs) -> None:
        samples = samples_from(outputs)
        if samples is None or trainer.sanity_checking:
            return
        rewards, attributes = self._epoch.setdefault(stage, ([], []))
        rewards.append({name: values.detach().float().cpu() for name, values in samples.rewards.items()})
        attributes.extend(samples.attributes)

    def _log_epoch(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        rewards, attributes = self._epoch.pop(stage, ([], []))
        if not rewards or trainer.sanity_checking:
            return
        names = rewards[0].keys()
        merged = {name: torch.cat([batch[name] for batch in rewards]) for name in names}
        self._log(trainer, pl_module, stage, merged, attributes, per_step=False, histograms=True)

    def _log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        rewards: dict[str, Tensor],
        attributes: list[dict[str, str]],
        per_step: bool,
        histograms: bool,
    ) -> None:
        when = {"on_step": per_step, "on_epoch": not per_step}
        writer = tensorboard_writer(trainer) if self.log_histograms and histograms else None
        for name, values in rewards.items():
            values = values.detach().float().to(pl_module.device)
            tag = f"{stage}/reward/{name}"
            pl_module.log(f"{tag}_mean", values.mean(), sync_dist=True, batch_size=len(values), **when)
            pl_module.log(f"{tag}_std", values.std(correction=0), sync_dist=True, batch_size=len(values), **when)
            for group, mask in attribute_groups(attributes, self.attribute_keys).items():
                selected = values[mask.to(values.device)]
                pl_module.log(f"{tag}/{group}", selected.mean(), batch_size=len(selected), rank_zero_only=True, **when)
            if writer is not None:
                writer.add_histogram(tag, values.cpu(), global_step=logging_step(trainer))


def attribute_groups(attributes: list[dict[str, str]], keys: list[str] | None = None) -> dict[str, Tensor]:
    """Boolean masks [B] of the samples sharing an attribute value, by "key=value" (sorted)."""
    keys = keys if keys is not None else sorted({key for attrs in attributes for key in attrs})
    groups = {}
    for key in keys:
        for value in sorted({attrs[key] for attrs in attributes if key in attrs}):
            groups[f"{key}={value}"] = torch.tensor([attrs.get(key) == value for attrs in attributes])
    return groups
