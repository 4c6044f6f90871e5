"""MusicRL's central picture: the reward against the KL to the reference model, over training."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure

from rlmusic_pl.callbacks.prediction_writer import figure_png
from rlmusic_pl.callbacks.tensorboard import logging_step
from rlmusic_pl.data.audio import atomic_write

PLOT_FILE = "reward_vs_kl.png"
TABLE_FILE = "reward_vs_kl.csv"


class RewardKLPlot(Callback):
    """Record the logged reward and KL of every training step; at the end of fit write them as a plot and a table.

    Writes ``<run dir>/reward_vs_kl.png`` (reward against KL, points joined in step order, coloured by
    step) and ``reward_vs_kl.csv`` (step, KL, reward) on global rank 0. Both values are the scalars the
    module logs (``MusicRLModule``: ``train/reward/total`` and ``train/kl``, the exact KL to the
    reference summed over a clip's codes). The history is saved in checkpoints, so a resumed run plots
    its whole course.

    Args:
        reward_key: the logged reward scalar.
        kl_key: the logged KL scalar.
    """

    def __init__(self, reward_key: str = "train/reward/total", kl_key: str = "train/kl") -> None:
        self.reward_key = reward_key
        self.kl_key = kl_key
        self.history: list[tuple[int, float, float]] = []  # (step, kl, reward)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        if self.reward_key in metrics and self.kl_key in metrics:
            self.history.append((logging_step(trainer), float(metrics[self.kl_key]), float(metrics[self.reward_key])))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        directory = Path(getattr(pl_module, "run_dir", None) or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / PLOT_FILE, lambda tmp: Path(tmp).write_bytes(self.plot()))
        atomic_write(directory / TABLE_FILE, lambda tmp: Path(tmp).write_text(self.table()))

    def plot(self) -> bytes:
        """The PNG of reward against KL."""
        steps, kls, rewards = zip(*self.history)
        figure = Figure(figsize=(5, 4))
        axes = figure.add_subplot()
        axes.plot(kls, rewards, color="0.7", linewidth=1)
        points = axes.scatter(kls, rewards, c=steps, cmap="viridis", s=16, zorder=2)
        figure.colorbar(points, ax=axes, label="step")
        axes.set_xlabel(f"KL to the reference ({self.kl_key})")
        axes.set_ylabel(f"reward ({self.reward_key})")
        figure.tight_layout()
        return figure_png(figure)

    def table(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "kl", "reward"])
        writer.writerows(self.history)
        return buffer.getvalue()

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(row) for row in state_dict["history"]]
