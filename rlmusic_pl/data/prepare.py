"""Audio folder -> saved log-mel features with a manifest (RLScale-LoRA: "convert these audio samples
into Mel-spectrogram features and save them separately").

    python -m rlmusic_pl prepare data/intense_jazz data/features/intense_jazz

Every file under the input folder (recursively; hidden files skipped) is read with soundfile
(wav, flac, ogg, ...: any sample rate and channel count), mixed to mono, resampled to 16 kHz and
turned into AudioLDM's log-mel [frames, 64], saved as ``<out>/features/<relative path>.npy``
(float32). ``<out>/manifest.jsonl`` lists one prepared file per line::

    {"source": "sub/a.wav", "features": "features/sub/a.wav.npy", "frames": 1001, "seconds": 10.0,
     "source_size": 320044, "source_mtime_ns": 1700000000000000000}

Files already prepared (same size and modification time, features present) are skipped, so an
interrupted run continues where it stopped: the manifest is rewritten (atomically) every
``MANIFEST_INTERVAL_S`` seconds during a run, so even a killed run loses at most that much work.
Files that cannot be used (not audio, corrupt, silent, shorter than one STFT frame or than
``--min-duration``) are reported by name and the rest go on. All files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlmusic_pl.data.audio import AUDIOLDM_MEL, AudioError, atomic_write, load_audio, log_mel, read_jsonl
from rlmusic_pl.errors import RLMusicError

MANIFEST = "manifest.jsonl"
FEATURES = "features"
DEFAULT_SILENCE_DB = -60.0
MANIFEST_INTERVAL_S = 1.0  # how often a run rewrites the manifest (rewriting it after every file costs O(files^2))


class DataFolderError(RLMusicError, ValueError):
    """A data folder is missing, empty or holds no usable example; the message names it."""


def list_files(folder: str | Path, exclude: Path | None = None) -> list[Path]:
    """Every non-hidden file under ``folder`` (recursively, sorted), except those under ``exclude``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFolderError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    exclude = exclude.resolve() if exclude is not None else None
    files = [
        path for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and (exclude is None or not path.resolve().is_relative_to(exclude))
    ]
    if not files:
        raise DataFolderError(f"{folder}: the folder holds no files")
    return files


def audio_features(path: str | Path, min_duration_s: float = 0.0, silence_db: float = DEFAULT_SILENCE_DB) -> torch.Tensor:
    """The log-mel [frames, 64] of one audio file; AudioError saying why a file cannot be used."""
    wave = load_audio(path, AUDIOLDM_MEL.sample_rate)
    seconds = wave.numel() / AUDIOLDM_MEL.sample_rate
    if wave.numel() < AUDIOLDM_MEL.win_length:
        raise AudioError(f"{path}: too short ({wave.numel()} samples at 16 kHz, fewer than one {AUDIOLDM_MEL.win_length}-sample frame)")
    if seconds < min_duration_s:
        raise AudioError(f"{path}: too short ({seconds:.2f} s, below the minimum duration of {min_duration_s} s)")
    peak = wave.abs().max().item()
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < silence_db:
        raise AudioError(f"{path}: silent (peak {peak_db:.1f} dBFS, below the silence threshold of {silence_db} dBFS)")
    return log_mel(wave, AUDIOLDM_MEL)


@dataclass
class PrepareReport:
    """What one ``prepare_folder`` run did: files prepared, skipped as already done, and failed (with why)."""

    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"prepared {len(self.prepared)}, already done {len(self.skipped)}, failed {len(self.failed)}"]
        lines += [f"  failed: {source}: {reason}" for source, reason in self.failed.items()]
        return "\n".join(lines)


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``prepare_folder``; the manifest lists every file done before it (``report``, of ``total``)."""

    def __init__(self, report: PrepareReport, total: int) -> None:
        super().__init__(f"interrupted after {len(report.prepared) + len(report.skipped)} of {total} files")
        self.report, self.total = report, total


def read_manifest(directory: str | Path) -> list[dict]:
    """The entries of ``<directory>/manifest.jsonl`` (an error names the line that is not an entry)."""
    path = Path(directory) / MANIFEST
    entries = []
    for number, entry in read_jsonl(path, DataFolderError):
        if not isinstance(entry, dict) or not {"source", "features"} <= entry.keys():
            raise DataFolderError(f"{path}:{number}: expected an object with 'source' and 'features', got {entry!r}")
        entries.append(entry)
    return entries


def write_manifest(directory: Path, entries: list[dict]) -> None:
    text = "".join(json.dumps(entry) + "\n" for entry in sorted(entries, key=lambda e: e["source"]))
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def is_done(entry: dict | None, source: Path, out: Path) -> bool:
    stat = source.stat()
    return (entry is not None and entry.get("source_size") == stat.st_size and entry.get("source_mtime_ns") == stat.st_mtime_ns
            and (out / entry["features"]).is_file())


def prepare_file(source: Path, relative: str, out: Path, min_duration_s: float, silence_db: float) -> dict:
    """Compute and save the features of one file; its manifest entry."""
    mel = audio_features(source, min_duration_s, silence_db).numpy().astype(np.float32)
    features = f"{FEATURES}/{relative}.npy"
    atomic_write(out / features, lambda tmp: np.save(tmp, mel))
    stat = source.stat()
    return {"source": relative, "features": features, "frames": int(mel.shape[0]),
            "seconds": round(mel.shape[0] * AUDIOLDM_MEL.hop_length / AUDIOLDM_MEL.sample_rate, 3),
            "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def split_done(
    files: list[Path], source: Path, out: Path, previous: dict[str, dict]
) -> tuple[dict[str, dict], list[tuple[Path, str]]]:
    """The manifest entries of the files already prepared, and (path, relative path) of the others."""
    done, todo = {}, []
    for path in files:
        relative = path.relative_to(source).as_posix()
        if is_done(previous.get(relative), path, out):
            done[relative] = previous[relative]
        else:
            todo.append((path, relative))
    return done, todo


def prepare_folder(source: str | Path, out: str | Path, min_duration_s: float = 0.0, silence_db: float = DEFAULT_SILENCE_DB,
                   overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Convert every audio file under ``source`` to log-mel features under ``out`` (see the module doc).

    Raises DataFolderError for a missing or empty folder; a file that cannot be used is reported in
    the returned ``PrepareReport.failed`` (and on stderr) and the others are still prepared.
    """
    source, out = Path(source), Path(out)
    files = list_files(source, exclude=out)
    previous = {} if overwrite or not (out / MANIFEST).is_file() else {e["source"]: e for e in read_manifest(out)}
    entries, todo = split_done(files, source, out, previous)
    report = PrepareReport(skipped=list(entries))
    written = time.monotonic()
    try:
        with tqdm(todo, desc=f"prepare {source}", unit="file", disable=not progress) as bar:
            for path, relative in bar:
                try:
                    entries[relative] = prepare_file(path, relative, out, min_duration_s, silence_db)
                    report.prepared.append(relative)
                except AudioError as err:
                    report.failed[relative] = str(err).removeprefix(f"{path}: ")
                    tqdm.write(f"skipped {err}", file=sys.stderr)
                if time.monotonic() - written >= MANIFEST_INTERVAL_S:
                    write_manifest(out, list(entries.values()))
                    written = time.monotonic()
    except KeyboardInterrupt:
        raise PrepareInterrupted(report, len(files)) from None
    finally:
        # Also on Ctrl-C: what is done stays listed, and the next run skips it.
        write_manifest(out, list(entries.values()))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlmusic_pl prepare",
        description="Convert a folder of audio files (wav, flac, ogg, ... at any sample rate and channel count) to "
        "AudioLDM log-mel features (16 kHz mono, 64 mel bins, 100 frames/s), saved as OUT/features/<file>.npy with "
        "a manifest OUT/manifest.jsonl. Files already prepared are skipped; unusable files are reported by name and "
        "the rest are still prepared. Exit status: 0 if every file was prepared, 1 if some were reported, 2 for a "
        "missing or empty folder, 130 if interrupted (Ctrl-C; run the same command again to resume).",
    )
    parser.add_argument("source", help="folder of audio files (searched recursively; hidden files are ignored)")
    parser.add_argument("out", help="output folder for features/ and manifest.jsonl (give it to the contrast sets as a folder)")
    parser.add_argument("--min-duration", type=float, default=0.0, metavar="SECONDS",
                        help="report files shorter than this as too short (default: %(default)s; files shorter than one "
                             "1024-sample STFT frame are always reported)")
    parser.add_argument("--silence-db", type=float, default=DEFAULT_SILENCE_DB, metavar="DBFS",
                        help="report files whose peak level is below this as silent (default: %(default)s dBFS)")
    parser.add_argument("--overwrite", action="store_true", help="prepare every file again, even those already done")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m rlmusic_pl prepare``: prepare one folder; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        report = prepare_folder(args.source, args.out, args.min_duration, args.silence_db, args.overwrite, not args.no_progress)
    except DataFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PrepareInterrupted as stop:
        done = len(stop.report.prepared) + len(stop.report.skipped)
        print(f"interrupted: {done} of {stop.total} files are prepared and listed in {Path(args.out) / MANIFEST}; "
              "run the same command again to prepare the rest", file=sys.stderr)
        return 130
    print(report.summary(), file=sys.stderr if report.failed else sys.stdout)
    print(f"features and {MANIFEST} in {args.out}")
    return 1 if report.failed else 0
