"""Labelled concept clips for MusicRFM: any folder of audio with a labels CSV, encoded to codes once and cached.

A concept folder holds audio files and ``labels.csv`` with a ``file`` column (paths relative to the
folder) and one column per label, e.g.::

    file,pitch_class,octave,brightness
    notes/C_3_bright_000.wav,C,3,bright

(``python -m rlmusic_pl synthesize OUT --concept notes`` writes such folders.) ``ConceptDataModule``
encodes every listed clip with the backbone's EnCodec in ``prepare_data`` and caches the codes under
``cache_dir`` (default ``<folder>/codes/<backbone>``)::

    codes/<backbone>/codes/<file>.pt     int16 codes [K, F]
    codes/<backbone>/manifest.jsonl      {"source": file, "features": "codes/<file>.pt", "frames": F, ...}

Clips already cached (same size and modification time) are skipped, so an interrupted run resumes;
a clip that cannot be read or is silent is reported by name and left out, the rest go on.
"""

from __future__ import annotations

import csv
import re
import sys
import time
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rlmusic_pl.data.audio import AudioError, atomic_write, load_audio
from rlmusic_pl.data.prepare import MANIFEST, MANIFEST_INTERVAL_S, DataFolderError, PrepareReport, is_done, read_manifest, write_manifest

LABELS_FILE = "labels.csv"
CODES = "codes"
SILENCE_PEAK = 1e-4  # -80 dBFS: a clip this quiet holds no concept


def read_labels(folder: Path, labels_file: str, label: str) -> dict[str, str]:
    """file -> label from ``<folder>/<labels_file>``; DataFolderError naming the file, line or column that is wrong."""
    path = folder / labels_file
    if not path.is_file():
        raise DataFolderError(f"{path}: no labels file; a concept folder needs a CSV with a 'file' column and a {label!r} column")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for needed in ("file", label):
            if needed not in columns:
                raise DataFolderError(f"{path}: no {needed!r} column (its columns: {columns})")
        labels = {}
        for number, row in enumerate(reader, start=2):
            if not row["file"] or row[label] in (None, ""):
                raise DataFolderError(f"{path}:{number}: empty 'file' or {label!r} cell")
            labels[row["file"]] = row[label]
    if not labels:
        raise DataFolderError(f"{path}: lists no clips")
    return labels


def backbone_slug(backbone: str, seed: int) -> str:
    """A folder name for the codes of ``backbone`` (the tiny preset's codec depends on its seed)."""
    name = f"tiny-seed{seed}" if backbone == "tiny" else backbone
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def encode_folder(folder: str | Path, files: list[str], backbone, cache: str | Path, progress: bool = True) -> PrepareReport:
    """Encode ``files`` (relative to ``folder``) with ``backbone`` (a ``MusicGenBackbone`` or a callable returning one,
    called only if some clip needs encoding) into ``cache``; see the module doc."""
    folder, cache = Path(folder), Path(cache)
    previous = {e["source"]: e for e in read_manifest(cache)} if (cache / MANIFEST).is_file() else {}
    entries, todo = {}, []
    report = PrepareReport()
    for relative in files:
        path = folder / relative
        if not path.is_file():
            report.failed[relative] = "no such file"
        elif is_done(previous.get(relative), path, cache):
            entries[relative] = previous[relative]
            report.skipped.append(relative)
        else:
            todo.append(relative)
    if todo and callable(backbone) and not isinstance(backbone, torch.nn.Module):
        backbone = backbone()
    written = time.monotonic()
    try:
        for relative in tqdm(todo, desc=f"encode {folder}", unit="clip", disable=not progress):
            path = folder / relative
            try:
                wave = load_audio(path, backbone.sample_rate)
                if wave.abs().max() < SILENCE_PEAK:
                    raise AudioError(f"{path}: silent (peak below {SILENCE_PEAK:g})")
                codes = backbone.encode_audio(wave[None])[0].to(torch.int16).cpu()
            except AudioError as err:
                report.failed[relative] = str(err).removeprefix(f"{path}: ")
                tqdm.write(f"skipped {err}", file=sys.stderr)
                continue
            target = f"{CODES}/{relative}.pt"
            atomic_write(cache / target, lambda tmp: torch.save(codes, tmp))
            stat = path.stat()
            entries[relative] = {"source": relative, "features": target, "frames": int(codes.shape[-1]),
                                 "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
            report.prepared.append(relative)
            if time.monotonic() - written >= MANIFEST_INTERVAL_S:
                write_manifest(cache, list(entries.values()))
                written = time.monotonic()
    finally:
        write_manifest(cache, list(entries.values()))  # also on Ctrl-C: what is done stays listed
    for relative, reason in report.failed.items():
        if reason == "no such file":
            print(f"skipped {folder / relative}: listed in the labels but no such file", file=sys.stderr)
    return report


class ConceptDataModule(LightningDataModule):
    """Labelled clips as EnCodec codes, for ``SteeringModule.fit``.

    Each item is ``{"codes": LongTensor [K, F], "label": str, "file": str}``; a batch holds lists of
    them (clips may differ in length). Every clip is in the training set: ``SteeringModule`` makes its
    own stratified validation split.

    Args:
        folder: the concept folder (audio files and ``labels_file``).
        label: the label column to learn (e.g. ``pitch_class``, ``interval``, ``tempo_bpm``).
        labels_file: the CSV under ``folder``.
        backbone: the MusicGen whose codec encodes the clips: the model's ``backbone`` (hub id, directory or ``tiny``).
        backbone_seed: the tiny backbone's seed (its codec depends on it).
        cache_dir: where codes are cached (default ``<folder>/codes/<backbone>``).
        batch_size: clips per batch.
        progress: show a progress bar while encoding.
    """

    def __init__(
        self,
        folder: str,
        label: str = "pitch_class",
        labels_file: str = LABELS_FILE,
        backbone: str = "facebook/musicgen-small",
        backbone_seed: int = 0,
        cache_dir: str | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataFolderError(f"batch_size must be at least 1, got {batch_size}")
        self.save_hyperparameters()
        self.folder = Path(folder).expanduser()
        self.label = label
        self.cache = Path(cache_dir).expanduser() if cache_dir else self.folder / CODES / backbone_slug(backbone, backbone_seed)
        self.items: list[dict] | None = None

    def load_backbone(self):
        from rlmusic_pl.backbone.musicgen import MusicGenBackbone  # only when a clip needs encoding

        return MusicGenBackbone.load(self.hparams.backbone, seed=self.hparams.backbone_seed)

    def prepare_data(self) -> None:
        labels = read_labels(self.folder, self.hparams.labels_file, self.label)
        report = encode_folder(self.folder, list(labels), self.load_backbone, self.cache, self.hparams.progress)
        print(f"concept clips of {self.folder}: encoded {len(report.prepared)}, cached {len(report.skipped)}, "
              f"failed {len(report.failed)}", file=sys.stderr if report.failed else sys.stdout)

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        labels = read_labels(self.folder, self.hparams.labels_file, self.label)
        if not (self.cache / MANIFEST).is_file():
            raise DataFolderError(f"{self.cache}: no encoded clips; ConceptDataModule.prepare_data encodes them")
        entries = {e["source"]: e for e in read_manifest(self.cache)}
        self.items = [{"file": f, "label": labels[f], "codes_path": self.cache / entries[f]["features"]} for f in labels if f in entries]
        if not self.items:
            raise DataFolderError(f"{self.folder}: none of the clips in {self.hparams.labels_file} could be encoded")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(ConceptCodes(self.items), batch_size=self.hparams.batch_size, collate_fn=collate_concepts)


class ConceptCodes(torch.utils.data.Dataset):
    """The cached codes and labels of a concept folder."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"codes": torch.load(item["codes_path"], weights_only=True).long(), "label": item["label"], "file": item["file"]}


def collate_concepts(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in ("codes", "label", "file")}
