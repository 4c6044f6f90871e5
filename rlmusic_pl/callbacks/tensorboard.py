"""Finding the TensorBoard writer of a trainer, its current logging step, and the samples in a step's outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch import Trainer

from rlmusic_pl.callbacks.samples import SampleBatch


def tensorboard_writer(trainer: Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or None without one.

    On ranks other than 0 Lightning hands out a no-op stand-in, so writing through it is safe.
    """
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def samples_from(outputs: Any) -> SampleBatch | None:
    """``outputs["samples"]`` when a step returned a mapping holding a SampleBatch, else None."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("samples"), SampleBatch):
        return outputs["samples"]
    return None


def logging_step(trainer: Trainer) -> int:
    """The step at which Lightning logs the current batch's metrics: training batches that stepped the optimizer.

    Histograms and audio are written at this step so they line up with the scalars; it differs from
    ``trainer.global_step`` (optimizer steps, counted after the step) under manual optimization.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped
