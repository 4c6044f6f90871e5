"""SweepWriter: the files of an attribute-strength sweep (WAVs, metric table, plots, mel grid, listening page).

Layout under the module's ``sweep_dir``::

    audio/<prompt>_<hash>_strength<+s>_seed<n>.wav   one 16-bit WAV per clip
    table.csv, table.json                           one row per clip: prompt, seed, strength, file,
                                                    attribute.<key>..., then one column per metric
    plots/<metric>.png                              each metric against strength: a line per prompt,
                                                    mean over seeds, shaded from min to max
    mel_grid.png                                    log-mels, a row per prompt, a column per strength
    index.html, mels/<clip>.png                     listening page: a row of players per prompt and seed,
                                                    ordered by strength, each with its mel and metrics

Every file is written atomically, and only when its content changed, so re-running a finished
sweep writes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from rlmusic_pl.callbacks.audio_logging import mel_image
from rlmusic_pl.callbacks.sweep_clips import Clip, SweepClips
from rlmusic_pl.callbacks.sweep_page import PAGE, sweep_page, thumbnail_file, thumbnail_png
from rlmusic_pl.callbacks.tensorboard import tensorboard_writer
from rlmusic_pl.data.audio import AUDIOLDM_MEL, atomic_write, load_audio, log_mel, write_wav

AUDIO_DIR = "audio"
TABLE_CSV = "table.csv"
TABLE_JSON = "table.json"
PLOTS_DIR = "plots"
MEL_GRID = "mel_grid.png"
SETTINGS_FILE = "sweep_settings.json"
CLIP_COLUMNS = ("prompt_index", "prompt", "negative_prompt", "seed", "strength", "file")
ATTRIBUTE_PREFIX = "attribute."


class SweepWriter(BasePredictionWriter):
    """Write what ``SweepModule.predict_step`` returns into the module's ``sweep_dir``.

    Each rank writes the WAVs of the clips it generated as its batches finish; at the end, rank 0
    gathers every clip's row and writes the table, the plots, the mel grid and the listening page.
    The table holds every clip of the sweep, including clips an earlier run wrote (the module reads
    and scores them), so the page of a resumed sweep shows every clip.

    Args:
        plots: draw ``plots/<metric>.png``.
        mel_grid: draw ``mel_grid.png`` (the lowest seed of each prompt).
        page: write the listening page ``index.html`` and its mel thumbnails ``mels/<clip>.png``.
        axis_label: what the swept value is called on the page and the plots (e.g. "coefficient");
            default: ``axis_label`` in ``sweep_settings.json`` if set there, else "strength".
        log_audio: also log newly generated clips to TensorBoard when the trainer has that logger.
        progress: show a progress bar of clips done (generated or found) on rank 0.
    """

    def __init__(
        self,
        plots: bool = True,
        mel_grid: bool = True,
        page: bool = True,
        axis_label: str | None = None,
        log_audio: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.plots = plots
        self.mel_grid = mel_grid
        self.page = page
        self.axis_label = axis_label
        self.log_audio = log_audio
        self.progress = progress
        self._rows: list[dict[str, Any]] = []
        self._bar: tqdm | None = None

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []
        clips_per_item = len(getattr(pl_module, "strengths", [])) * len(getattr(pl_module, "seeds", []))
        dataset = getattr(trainer.predict_dataloaders, "dataset", None)
        total = len(dataset) * clips_per_item if trainer.world_size == 1 and dataset is not None else None
        self._bar = tqdm(total=total, desc="sweep clips", unit="clip", disable=not (self.progress and trainer.is_global_zero))
        self._generated = 0

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: SweepClips, batch_indices, batch, batch_idx: int, dataloader_idx: int
    ) -> None:
        audio_dir = pl_module.sweep_dir / AUDIO_DIR
        writer = tensorboard_writer(trainer) if self.log_audio else None
        for name, wave in prediction.new_audio.items():
            write_wav(audio_dir / name, wave, prediction.sample_rate)
            if writer is not None:
                writer.add_audio(f"sweep/{Path(name).stem}", wave.clamp(-1.0, 1.0), 0, sample_rate=prediction.sample_rate)
        for clip in prediction.clips:
            # The dataset index orders the table as the prompts are configured, whichever rank ran them.
            prompt_index = batch_indices[clip.item] if batch_indices else batch_idx * len(batch["prompt"]) + clip.item
            self._rows.append(table_row(clip, prompt_index))
        if self._bar is not None:
            self._generated += len(prediction.new_audio)
            self._bar.update(len(prediction.clips))
            self._bar.set_postfix(generated=self._generated)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        if self._bar is not None:
            self._bar.close()
        rows = gather_rows(self._rows, trainer.world_size)
        if not trainer.is_global_zero or not rows:
            return
        out = pl_module.sweep_dir
        rows = sort_rows(rows)
        settings = read_settings(out)
        axis_label = self.axis_label or settings.get("axis_label") or "strength"
        write_table(out, rows)
        if self.plots:
            for metric in metric_names(rows):
                write_if_changed(out / plot_file(metric), figure_png(plot_metric(rows, metric, axis_label)))
        if self.mel_grid:
            write_if_changed(out / MEL_GRID, figure_png(plot_mel_grid(rows, out, axis_label)))
        if self.page:
            write_page(out, rows, {**adapter_description(pl_module), **settings}, axis_label)


# ------------------------------------------------------------------------------ rows and table
def table_row(clip: Clip, prompt_index: int) -> dict[str, Any]:
    """One table row: the clip's identity, its attributes (``attribute.<key>``) and its metrics."""
    row = {"prompt_index": int(prompt_index), "prompt": clip.prompt, "negative_prompt": clip.negative_prompt,
           "seed": clip.seed, "strength": clip.strength, "file": f"{AUDIO_DIR}/{clip.file_name}"}
    row.update({f"{ATTRIBUTE_PREFIX}{key}": value for key, value in sorted(clip.attributes.items())})
    row.update(clip.metrics or {})
    return row


def gather_rows(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's rows (on every rank); the rows themselves with one process."""
    if world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return list(rows)
    gathered: list[list[dict[str, Any]] | None] = [None] * world_size
    dist.all_gather_object(gathered, rows)
    return [row for rank_rows in gathered for row in rank_rows]


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per file (a repeated prompt makes the same clips), by prompt order, seed and strength."""
    unique = {row["file"]: row for row in rows}
    return sorted(unique.values(), key=lambda row: (row["prompt_index"], row["seed"], row["strength"]))


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update((key, None) for key in row if key not in CLIP_COLUMNS and not key.startswith(ATTRIBUTE_PREFIX))
    return list(names)


def write_table(directory: Path, rows: list[dict[str, Any]]) -> None:
    """``table.csv`` and ``table.json`` with the same columns (a missing attribute is empty / null)."""
    attributes = sorted({key for row in rows for key in row if key.startswith(ATTRIBUTE_PREFIX)})
    columns = [*CLIP_COLUMNS, *attributes, *metric_names(rows)]
    complete = [{column: row.get(column) for column in columns} for row in rows]
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    table.writeheader()
    table.writerows(complete)
    write_if_changed(directory / TABLE_CSV, text.getvalue().encode())
    write_if_changed(directory / TABLE_JSON, (json.dumps(complete, indent=1, allow_nan=False) + "\n").encode())


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` to ``path`` unless it already holds exactly that; True if written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return True


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def plot_file(metric: str) -> str:
    return f"{PLOTS_DIR}/{safe_name(metric)}.png"


def read_settings(directory: Path) -> dict[str, Any]:
    """The generation settings the sweep module recorded in ``directory`` (empty if none)."""
    path = directory / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def adapter_description(pl_module: LightningModule) -> dict[str, str]:
    """The swept adapter's directory and kind, when the module has one."""
    described = {"adapter": getattr(pl_module, "adapter_path", None), "adapter_kind": getattr(pl_module, "adapter_kind", None)}
    return {key: str(value) for key, value in described.items() if value is not None}


# ------------------------------------------------------------------------------ listening page
def write_page(directory: Path, rows: list[dict[str, Any]], settings: dict[str, Any], axis_label: str) -> None:
    """``index.html`` of ``rows`` with each clip's mel thumbnail; links only the files that exist."""
    for row in rows:
        write_thumbnail(directory, row["file"])
    metrics = metric_names(rows)
    plots = {metric: plot_file(metric) for metric in metrics if (directory / plot_file(metric)).is_file()}
    links = [name for name in (TABLE_CSV, TABLE_JSON, MEL_GRID, SETTINGS_FILE) if (directory / name).is_file()]
    page = sweep_page(rows, metrics, settings, plots, links, axis="strength", axis_label=axis_label)
    write_if_changed(directory / PAGE, page.encode())


def write_thumbnail(directory: Path, clip_file: str) -> None:
    """The clip's mel thumbnail, unless one at least as new as the clip exists (a regenerated clip gets a new one)."""
    clip, thumbnail = directory / clip_file, directory / thumbnail_file(clip_file)
    if not thumbnail.is_file() or thumbnail.stat().st_mtime_ns < clip.stat().st_mtime_ns:
        png = thumbnail_png(clip_mel_image(clip))
        atomic_write(thumbnail, lambda tmp: Path(tmp).write_bytes(png))


def clip_mel_image(path: Path) -> torch.Tensor:
    """The log-mel image [n_mels, frames] in [0, 1] of the WAV at ``path``."""
    return mel_image(log_mel(load_audio(path, AUDIOLDM_MEL.sample_rate), AUDIOLDM_MEL))


# ------------------------------------------------------------------------------ figures
def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_metric(rows: list[dict[str, Any]], metric: str, axis_label: str = "strength") -> Figure:
    """``metric`` against strength (named ``axis_label``): one line per prompt (mean over seeds), shaded from min to max."""
    by_prompt: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: dict[int, str] = {}
    for row in rows:
        if row.get(metric) is not None:
            by_prompt[row["prompt_index"]][row["strength"]].append(row[metric])
            labels[row["prompt_index"]] = row["prompt"]
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for index, values in sorted(by_prompt.items()):
        strengths = sorted(values)
        per_strength = [torch.tensor(values[s]) for s in strengths]
        mean = [v.mean().item() for v in per_strength]
        line, = axes.plot(strengths, mean, marker="o", label=_short(labels[index], 50))
        axes.fill_between(strengths, [v.min().item() for v in per_strength], [v.max().item() for v in per_strength],
                          color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel(axis_label)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against {axis_label} (mean and range over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_mel_grid(rows: list[dict[str, Any]], directory: Path, axis_label: str = "strength") -> Figure:
    """Log-mels of each prompt (row) at each strength (column), for each prompt's lowest seed."""
    first_seed = {}
    for row in rows:
        first_seed.setdefault(row["prompt_index"], row["seed"])
    shown = [row for row in rows if row["seed"] == first_seed[row["prompt_index"]]]
    prompts = sorted(first_seed)
    strengths = sorted({row["strength"] for row in shown})
    figure = Figure(figsize=(2.2 * len(strengths) + 1, 1.8 * len(prompts) + 0.6))
    grid = figure.subplots(len(prompts), len(strengths), squeeze=False)
    for row in shown:
        axes = grid[prompts.index(row["prompt_index"])][strengths.index(row["strength"])]
        axes.imshow(clip_mel_image(directory / row["file"]).numpy(), aspect="auto", cmap="magma")
    for r, index in enumerate(prompts):
        prompt = next(row["prompt"] for row in shown if row["prompt_index"] == index)
        grid[r][0].set_ylabel(f"{_short(prompt, 28)}\nseed {first_seed[index]}", fontsize="x-small")
    for c, strength in enumerate(strengths):
        grid[0][c].set_title(f"{axis_label} {strength:+g}", fontsize="small")
    for axes in grid.flat:
        axes.set_xticks([])
        axes.set_yticks([])
    figure.tight_layout()
    return figure


def _short(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"
