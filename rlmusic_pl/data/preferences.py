"""Pairwise preference data: (prompt, chosen audio, rejected audio[, tie]) read from a JSONL or CSV file.

One pair per JSONL line or CSV row::

    {"prompt": "a calm piano", "chosen": "clips/a.wav", "rejected": "clips/b.wav", "tie": false, "mood": "calm"}

- ``prompt``, ``chosen`` and ``rejected`` are required; the audio paths are relative to the pairs
  file (absolute paths work too). The Audio-Alpaca / Tango 2 names are accepted as they are:
  ``captions`` or ``caption`` for the prompt, ``reject`` for the rejected clip, and an audio cell
  exported by ``datasets`` (a mapping with a ``path``) for either clip; its ``strategy`` column
  becomes an attribute like any other.
- ``tie`` (optional): true/false, 1/0 or yes/no; a tie is learned as probability 1/2 either way.
- ``negative_prompt`` (optional) overrides the data module's; ``attributes`` (a mapping) and every
  other key or column are attributes (numbers are kept as their text).

Each audio file is read once (any format soundfile reads, mixed to mono, resampled to
``sample_rate``) and cached as ``.npy`` under ``cache_dir`` with a manifest; files already cached
(same size and modification time) are not read again, so an interrupted run continues where it
stopped. A bad pair (empty prompt, missing or unreadable file, the same file on both sides, a bad tie
flag) is reported with its file and line and skipped (``bad_pairs="skip"``) or stops the run
(``bad_pairs="error"``); the run reports how many pairs it kept.

``PromptAttributeDataModule(preferences=PreferencePairs(...))`` makes every item a pair.
"""

from __future__ import annotations

import csv
import hashlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from rlmusic_pl.data.audio import AudioError, atomic_write, load_audio, read_jsonl
from rlmusic_pl.data.prepare import MANIFEST_INTERVAL_S, is_done, read_manifest, write_manifest
from rlmusic_pl.data.prompts import PromptError, PromptItem, parse_entry
from rlmusic_pl.errors import RLMusicError

PROMPT_KEYS = ("prompt", "captions", "caption")
CHOSEN_KEYS = ("chosen",)
REJECTED_KEYS = ("rejected", "reject")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")
MAX_REPORTED = 10  # bad pairs named one by one; the rest are counted


class PreferenceDataError(RLMusicError, ValueError):
    """A preference file or pair cannot be used; the message names the file and line."""


def _one_of(record: dict, keys: tuple[str, ...], where: str) -> Any:
    present = [key for key in keys if key in record]
    if len(present) > 1:
        raise PreferenceDataError(f"{where}: give only one of {present} (they name the same field)")
    return record.pop(present[0]) if present else None


def _audio_path(value: Any, side: str, base: Path, where: str) -> Path:
    if isinstance(value, Mapping):  # a `datasets` Audio cell exported to JSON: {"path": ..., "bytes": ...}
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise PreferenceDataError(f"{where}: missing or empty {side!r} (expected an audio file path), got {value!r}")
    path = (base / value.strip()).resolve()
    if not path.is_file():
        raise PreferenceDataError(f"{where}: {side} file {value!r} not found (looked for {path})")
    return path


def _tie(value: Any, where: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise PreferenceDataError(f"{where}: 'tie' must be true/false, 1/0 or yes/no, got {value!r}")


def parse_pair(record: Any, where: str, base: Path) -> PromptItem:
    """Validate one pair record; an item with ``prompt``, ``attributes``, ``chosen``/``rejected`` (absolute paths) and ``tie``.

    ``where`` names the record in errors (``pairs.jsonl:7``); ``base`` is the folder relative paths start from.
    """
    if not isinstance(record, Mapping):
        raise PreferenceDataError(f"{where}: expected an object with prompt, chosen and rejected, got {record!r}")
    record = dict(record)
    prompt = _one_of(record, PROMPT_KEYS, where)
    chosen = _audio_path(_one_of(record, CHOSEN_KEYS, where), "chosen", base, where)
    rejected = _audio_path(_one_of(record, REJECTED_KEYS, where), "rejected", base, where)
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: the same file {chosen} is on both sides (chosen and rejected)")
    tie = _tie(record.pop("tie", None), where)
    # Scores and other numbers exported with a data set are attributes too, as text.
    record = {key: str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
              for key, value in record.items()}
    try:
        item = parse_entry({**record, "prompt": prompt}, where)
    except PromptError as err:
        raise PreferenceDataError(str(err)) from None
    return {**item, "chosen": str(chosen), "rejected": str(rejected), "tie": tie, "pair": where}


def read_pair_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, raw record) for each pair of a ``.jsonl`` or ``.csv`` file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, record in read_jsonl(path, PreferenceDataError, encoding="utf-8-sig"):
            yield f"{path}:{number}", record
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or None in row.values():
                    raise PreferenceDataError(f"{where}: expected {len(reader.fieldnames)} fields, as many as the header")
                yield where, row
    else:
        raise PreferenceDataError(f"{path}: unsupported preference file type {path.suffix!r}, expected .jsonl or .csv")


def cache_key(path: str) -> str:
    return f"audio/{hashlib.sha1(path.encode()).hexdigest()[:16]}.npy"


def cache_audio(files: list[str], cache_dir: Path, sample_rate: int) -> tuple[dict[str, str], dict[str, str]]:
    """Read each file not yet cached and save its waveform; ({file: cached .npy}, {file: why unreadable}).

    The manifest is rewritten every ``MANIFEST_INTERVAL_S`` and at the end (also on Ctrl-C), so an
    interrupted run keeps what it did.
    """
    previous = {entry["source"]: entry for entry in read_manifest(cache_dir)} if (cache_dir / "manifest.jsonl").is_file() else {}
    entries = {source: entry for source, entry in previous.items() if Path(source).is_file() and is_done(entry, Path(source), cache_dir)}
    failed: dict[str, str] = {}
    written = time.monotonic()
    try:
        for source in files:
            if source in entries or source in failed:
                continue
            try:
                wave = load_audio(source, sample_rate).numpy().astype(np.float32)
            except AudioError as err:
                failed[source] = str(err)
                continue
            features = cache_key(source)
            atomic_write(cache_dir / features, lambda tmp: np.save(tmp, wave))
            stat = Path(source).stat()
            entries[source] = {"source": source, "features": features, "samples": int(wave.shape[0]),
                               "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
            if time.monotonic() - written >= MANIFEST_INTERVAL_S:
                write_manifest(cache_dir, list(entries.values()))
                written = time.monotonic()
    finally:
        write_manifest(cache_dir, list(entries.values()))
    return {source: entry["features"] for source, entry in entries.items()}, failed


class PreferencePairs:
    """A preference file's pairs, validated, with every clip read once into an audio cache.

    Args:
        path: the ``.jsonl`` or ``.csv`` pairs file (see the module doc for its fields).
        sample_rate: rate the clips are resampled to (16000 for AudioLDM2; a CLAP encoder resamples
            again to its own rate).
        duration_s: every clip is cut to, or padded with silence to, this many seconds, so pairs batch.
        cache_dir: where the decoded clips are cached (default ``<pairs file>.cache/<sample_rate>hz``
            beside the file).
        bad_pairs: ``skip`` reports each bad pair (with its line) and goes on; ``error`` stops at the first.
    """

    def __init__(
        self,
        path: str,
        sample_rate: int = 16000,
        duration_s: float = 10.0,
        cache_dir: str | None = None,
        bad_pairs: Literal["skip", "error"] = "skip",
    ) -> None:
        if sample_rate <= 0 or duration_s <= 0:
            raise PreferenceDataError(f"sample_rate and duration_s must be > 0, got {sample_rate} and {duration_s}")
        if bad_pairs not in ("skip", "error"):
            raise PreferenceDataError(f"bad_pairs must be 'skip' or 'error', got {bad_pairs!r}")
        self.path = Path(path)
        self.sample_rate, self.duration_s, self.bad_pairs = sample_rate, duration_s, bad_pairs
        self.cache_dir = Path(cache_dir) if cache_dir else self.path.with_name(self.path.name + ".cache") / f"{sample_rate}hz"
        self._items: list[PromptItem] | None = None
        self._cached: dict[str, str] = {}

    @property
    def num_samples(self) -> int:
        return round(self.duration_s * self.sample_rate)

    def items(self) -> list[PromptItem]:
        """The usable pairs, in file order (read, checked and cached on first use)."""
        if self._items is None:
            self._items = self._load()
        return self._items

    def _load(self) -> list[PromptItem]:
        if not self.path.is_file():
            raise PreferenceDataError(f"preference file not found: {self.path}")
        pairs, bad, total = [], [], 0
        try:
            records = list(read_pair_records(self.path))
        except UnicodeDecodeError as err:
            raise PreferenceDataError(f"{self.path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for where, record in records:
            total += 1
            try:
                pairs.append(parse_pair(record, where, self.path.parent))
            except PreferenceDataError as err:
                bad.append(self._bad(err))
        files = list(dict.fromkeys(file for pair in pairs for file in (pair["chosen"], pair["rejected"])))
        self._cached, failed = cache_audio(files, self.cache_dir, self.sample_rate)
        kept = []
        for pair in pairs:
            reason = failed.get(pair["chosen"]) or failed.get(pair["rejected"])
            if reason:
                bad.append(self._bad(PreferenceDataError(f"{pair['pair']}: {reason}")))
            else:
                kept.append(pair)
        for message in bad[:MAX_REPORTED]:
            rank_zero_warn(f"skipped bad preference pair: {message}")
        if len(bad) > MAX_REPORTED:
            rank_zero_warn(f"... and {len(bad) - MAX_REPORTED} more bad preference pairs in {self.path}")
        rank_zero_info(f"preference pairs {self.path}: kept {len(kept)} of {total} ({len(bad)} skipped)")
        if not kept:
            raise PreferenceDataError(f"{self.path}: no usable preference pair ({total} read, {len(bad)} bad)")
        return kept

    def _bad(self, err: PreferenceDataError) -> str:
        if self.bad_pairs == "error":
            raise err
        return str(err)

    def audio(self, file: str) -> Tensor:
        """The cached clip of ``file`` as a float tensor [num_samples] (cut or padded with silence)."""
        self.items()
        wave = np.load(self.cache_dir / self._cached[file], mmap_mode="r")[: self.num_samples]
        wave = torch.from_numpy(np.array(wave, dtype=np.float32))
        return torch.nn.functional.pad(wave, (0, self.num_samples - wave.shape[0]))


class PreferenceDataset(Dataset):
    """Pair items with their audio: each is the item plus ``chosen_audio`` and ``rejected_audio``
    (Tensor [num_samples] at ``sample_rate``, the pairs' rate) and ``tie`` (a bool Tensor); ``chosen`` and
    ``rejected`` stay the files' paths (a key for caching anything derived from the clip)."""

    def __init__(self, items: list[PromptItem], pairs: PreferencePairs) -> None:
        self.items, self.pairs = items, pairs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {**item, "tie": torch.tensor(item["tie"]), "sample_rate": self.pairs.sample_rate,
                "chosen_audio": self.pairs.audio(item["chosen"]), "rejected_audio": self.pairs.audio(item["rejected"])}
