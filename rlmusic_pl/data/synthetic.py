"""Synthetic contrasting audio sets: bright vs dull notes, for tests and the quick start.

No music data set can be downloaded where the tests run, so the Stage-1 quick start trains its
slider on two generated sets that differ in one attribute only. Clip ``i`` of both sets plays the
same random notes (pitch, onset, length, loudness); the positive ("bright") clip gives them strong
upper harmonics (amplitude 1/k), the negative ("dull") clip almost none (1/k^4). The attribute is
easy to measure (spectral centroid, or the mean log-mel of the upper bins) and everything is
determined by the seed.

    python -m rlmusic_pl synthesize runs/synthetic/brightness --count 8 --duration 2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from rlmusic_pl.data.audio import AUDIOLDM_MEL, write_wav

POSITIVE, NEGATIVE = "bright", "dull"
HARMONICS = 16
ROLLOFF = {POSITIVE: 1.0, NEGATIVE: 4.0}  # harmonic k has amplitude 1 / k**rolloff


def note_plan(generator: torch.Generator, duration_s: float, notes_per_second: float) -> list[tuple[float, float, float, float]]:
    """Random notes as (onset s, length s, fundamental Hz, amplitude), MIDI pitches 45-69."""
    count = max(1, round(duration_s * notes_per_second))
    onsets = torch.rand(count, generator=generator) * duration_s * 0.8
    lengths = 0.2 + torch.rand(count, generator=generator) * 0.6
    pitches = torch.randint(45, 70, (count,), generator=generator)
    amplitudes = 0.5 + 0.5 * torch.rand(count, generator=generator)
    return [
        (float(onset), float(length), 440.0 * 2 ** ((int(pitch) - 69) / 12), float(amplitude))
        for onset, length, pitch, amplitude in zip(onsets, lengths, pitches, amplitudes)
    ]


def render_notes(notes: list[tuple[float, float, float, float]], duration_s: float, rolloff: float,
                 sample_rate: int = AUDIOLDM_MEL.sample_rate) -> torch.Tensor:
    """Additive synthesis of ``notes`` with harmonic amplitudes 1/k**rolloff, peak-normalised to 0.5."""
    time = torch.arange(round(duration_s * sample_rate), dtype=torch.float64) / sample_rate
    wave = torch.zeros_like(time)
    for onset, length, frequency, amplitude in notes:
        local = time - onset
        envelope = torch.where((local >= 0) & (local < length), torch.exp(-3.0 * local.clamp(min=0)), 0.0)
        envelope = envelope * (1 - torch.exp(-local.clamp(min=0) / 0.005))  # 5 ms attack: no click
        for k in range(1, HARMONICS + 1):
            if k * frequency < sample_rate / 2:
                wave += amplitude * envelope * torch.sin(2 * math.pi * k * frequency * local) / k**rolloff
    return (0.5 * wave / wave.abs().max().clamp(min=1e-9)).float()


def write_contrast_sets(directory: str | Path, count: int = 8, duration_s: float = 2.0, notes_per_second: float = 3.0,
                        seed: int = 0) -> tuple[Path, Path]:
    """Write ``count`` bright and ``count`` dull clips under ``directory``/bright and /dull.

    Existing clips are kept (the content is fixed by the seed), so repeated calls are cheap.
    Returns the (positive, negative) folders.
    """
    if count < 1 or duration_s <= 0 or notes_per_second <= 0:
        raise ValueError(f"count, duration_s and notes_per_second must be positive, got {count}, {duration_s}, {notes_per_second}")
    directory = Path(directory)
    folders = {side: directory / side for side in (POSITIVE, NEGATIVE)}
    for index in range(count):
        paths = {side: folder / f"{side}_{index:03d}.wav" for side, folder in folders.items()}
        if all(path.is_file() for path in paths.values()):
            continue
        notes = note_plan(torch.Generator().manual_seed(seed * 100_003 + index), duration_s, notes_per_second)
        for side, path in paths.items():
            write_wav(path, render_notes(notes, duration_s, ROLLOFF[side]), AUDIOLDM_MEL.sample_rate)
    return folders[POSITIVE], folders[NEGATIVE]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlmusic_pl synthesize",
        description="Write two synthetic contrasting audio sets (bright vs dull notes, 16 kHz mono WAV) into "
        "OUT/bright and OUT/dull, for trying the Stage-1 slider without a data set.",
    )
    parser.add_argument("out", help="output folder; the sets go to OUT/bright and OUT/dull (existing clips are kept)")
    parser.add_argument("--count", type=int, default=8, help="clips per set (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per clip (default: %(default)s)")
    parser.add_argument("--notes-per-second", type=float, default=3.0, help="average note density (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same clips (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m rlmusic_pl synthesize``: write the synthetic sets; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        positive, negative = write_contrast_sets(args.out, args.count, args.duration, args.notes_per_second, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.count} clips each to {positive} and {negative}")
    return 0
