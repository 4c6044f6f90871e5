"""Synthetic audio with known labels: contrasting bright vs dull sets, and single labelled notes.

No music data set can be downloaded where the tests run, so the Stage-1 quick start trains its
slider on two generated sets that differ in one attribute only. Clip ``i`` of both sets plays the
same random notes (pitch, onset, length, loudness); the positive ("bright") clip gives them strong
upper harmonics (amplitude 1/k), the negative ("dull") clip almost none (1/k^4). The attribute is
easy to measure (spectral centroid, or the mean log-mel of the upper bins) and everything is
determined by the seed.

Labelled notes (``NoteLabel``, ``render_note``, ``labelled_notes``) play one pitch class in a given
octave and brightness, optionally repeated at a tempo; each label gives the prompt that describes it
("a bright C note", "a dull G note at 90 bpm") and its prompt attributes, for training a small
text-to-music model whose conditioning can be checked, and for concept sets (SynTheory-style).

    python -m rlmusic_pl synthesize runs/synthetic/brightness --count 8 --duration 2
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlmusic_pl.data.audio import AUDIOLDM_MEL, write_wav

POSITIVE, NEGATIVE = "bright", "dull"
HARMONICS = 16
ROLLOFF = {POSITIVE: 1.0, NEGATIVE: 4.0}  # harmonic k has amplitude 1 / k**rolloff
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLATS = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#"}


def pitch_class_index(name: str | int) -> int:
    """The pitch class 0-11 (C = 0) of a name ("C", "F#", "Bb", any case) or of an integer / digit string 0-11."""
    text = str(name).strip()
    if text.isdigit() and 0 <= int(text) < 12:
        return int(text)
    canonical = text[:1].upper() + text[1:].lower().replace("♯", "#").replace("♭", "b")
    canonical = FLATS.get(canonical, canonical)
    if canonical not in PITCH_CLASSES:
        raise ValueError(f"unknown pitch class {name!r}; expected one of {', '.join(PITCH_CLASSES)} (or a flat such as Bb, or 0-11)")
    return PITCH_CLASSES.index(canonical)


def midi_frequency(midi: float) -> float:
    """The equal-tempered frequency in Hz of MIDI note ``midi`` (69 = A4 = 440 Hz)."""
    return 440.0 * 2 ** ((midi - 69) / 12)


def note_plan(generator: torch.Generator, duration_s: float, notes_per_second: float) -> list[tuple[float, float, float, float]]:
    """Random notes as (onset s, length s, fundamental Hz, amplitude), MIDI pitches 45-69."""
    count = max(1, round(duration_s * notes_per_second))
    onsets = torch.rand(count, generator=generator) * duration_s * 0.8
    lengths = 0.2 + torch.rand(count, generator=generator) * 0.6
    pitches = torch.randint(45, 70, (count,), generator=generator)
    amplitudes = 0.5 + 0.5 * torch.rand(count, generator=generator)
    return [
        (float(onset), float(length), midi_frequency(int(pitch)), float(amplitude))
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


@dataclass(frozen=True)
class NoteLabel:
    """What a labelled clip plays: one pitch class in one octave, bright or dull, held or repeated at a tempo.

    Attributes:
        pitch_class: 0-11 (C = 0; names in ``PITCH_CLASSES``).
        octave: scientific octave (C4 is middle C, MIDI 60).
        brightness: ``"bright"`` (harmonics 1/k) or ``"dull"`` (1/k^4), the keys of ``ROLLOFF``.
        tempo_bpm: None for one note held over the clip, else a note every 60 / tempo_bpm seconds.
    """

    pitch_class: int
    octave: int = 4
    brightness: str = POSITIVE
    tempo_bpm: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.pitch_class < 12:
            raise ValueError(f"pitch_class must be in 0-11, got {self.pitch_class}")
        if self.brightness not in ROLLOFF:
            raise ValueError(f"brightness must be one of {sorted(ROLLOFF)}, got {self.brightness!r}")
        if self.tempo_bpm is not None and not self.tempo_bpm > 0:
            raise ValueError(f"tempo_bpm must be > 0 or None, got {self.tempo_bpm}")

    @property
    def name(self) -> str:
        """The pitch class's name, e.g. ``"C#"``."""
        return PITCH_CLASSES[self.pitch_class]

    @property
    def midi(self) -> int:
        return 12 * (self.octave + 1) + self.pitch_class

    @property
    def frequency(self) -> float:
        """The fundamental in Hz."""
        return midi_frequency(self.midi)

    def prompt(self) -> str:
        """The text that describes the clip, e.g. ``"a bright C note"`` or ``"a dull G note at 90 bpm"``."""
        tempo = f" at {self.tempo_bpm:g} bpm" if self.tempo_bpm is not None else ""
        return f"a {self.brightness} {self.name} note{tempo}"

    def attributes(self) -> dict[str, str]:
        """Prompt attributes (strings, as prompt files hold them) that rewards such as ``PitchClassReward`` read."""
        attributes = {"pitch_class": self.name, "octave": str(self.octave), "brightness": self.brightness}
        if self.tempo_bpm is not None:
            attributes["tempo_bpm"] = f"{self.tempo_bpm:g}"
        return attributes


def render_note(label: NoteLabel, duration_s: float, sample_rate: int = AUDIOLDM_MEL.sample_rate) -> torch.Tensor:
    """The clip ``label`` describes, [duration_s * sample_rate] samples peak-normalised to 0.5.

    A held note lasts the whole clip; at a tempo, each note lasts 90% of a beat. Both decay as the
    notes of ``render_notes`` do.
    """
    if label.tempo_bpm is None:
        notes = [(0.0, duration_s, label.frequency, 1.0)]
    else:
        beat = 60.0 / label.tempo_bpm
        notes = [(i * beat, 0.9 * beat, label.frequency, 1.0) for i in range(math.ceil(duration_s / beat))]
    return render_notes(notes, duration_s, ROLLOFF[label.brightness], sample_rate)


def random_note_labels(
    count: int,
    generator: torch.Generator,
    octaves: tuple[int, ...] = (3, 4),
    brightness: tuple[str, ...] = (POSITIVE, NEGATIVE),
    tempos: tuple[float | None, ...] = (None,),
) -> list[NoteLabel]:
    """``count`` labels with a uniformly random pitch class, octave, brightness and tempo from the choices given."""
    def pick(choices: tuple, size: int) -> list:
        return [choices[i] for i in torch.randint(len(choices), (size,), generator=generator).tolist()]

    pitch_classes = torch.randint(12, (count,), generator=generator).tolist()
    return [
        NoteLabel(pc, octave, bright, tempo)
        for pc, octave, bright, tempo in zip(pitch_classes, pick(octaves, count), pick(brightness, count), pick(tempos, count))
    ]


def labelled_notes(
    count: int, duration_s: float, seed: int = 0, sample_rate: int = AUDIOLDM_MEL.sample_rate, **choices
) -> tuple[torch.Tensor, list[NoteLabel]]:
    """``count`` random labelled clips [count, samples] and their labels, determined by ``seed``.

    ``choices`` (octaves, brightness, tempos) go to ``random_note_labels``.
    """
    if count < 1 or duration_s <= 0:
        raise ValueError(f"count and duration_s must be positive, got {count}, {duration_s}")
    labels = random_note_labels(count, torch.Generator().manual_seed(seed), **choices)
    return torch.stack([render_note(label, duration_s, sample_rate) for label in labels]), labels


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
        "OUT/bright and OUT/dull, for trying the Stage-1 slider without a data set; or, with --concept, a labelled "
        "concept set (OUT/<concept>/*.wav and OUT/labels.csv) for MusicRFM's SteeringModule.",
    )
    parser.add_argument("out", help="output folder; the sets go to OUT/bright and OUT/dull (existing clips are kept)")
    parser.add_argument("--concept", choices=("notes", "intervals", "tempos", "brightness"), default=None,
                        help="write a SynTheory-style labelled set instead: notes (12 pitch classes x --octaves x 2 timbres), "
                             "intervals (1-12 semitones x 12 roots x 2 timbres), tempos (--count clips over --tempo-range) "
                             "or brightness (--count held notes, harmonic roll-off from dull to bright: a continuous label)")
    parser.add_argument("--octaves", type=int, nargs="+", default=[3, 4, 5],
                        help="octaves of --concept notes and brightness (default: 3 4 5)")
    parser.add_argument("--tempo-range", type=float, nargs=2, default=[60.0, 180.0], metavar=("LOW", "HIGH"),
                        help="tempos in bpm of --concept tempos, evenly spaced (default: 60 180)")
    parser.add_argument("--count", type=int, default=8, help="clips per set, or in the --concept tempos set (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per clip (default: %(default)s)")
    parser.add_argument("--notes-per-second", type=float, default=3.0, help="average note density (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same clips (default: %(default)s)")
    parser.add_argument("--sample-rate", type=int, default=AUDIOLDM_MEL.sample_rate,
                        help="sample rate in Hz of --concept clips, e.g. 8000 for the trained tiny MusicGen (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m rlmusic_pl synthesize``: write the synthetic sets; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concept is not None:
        from rlmusic_pl.data.concept_sets import write_concept_set  # it builds on this module

        try:
            count = write_concept_set(args.out, args.concept, args.duration, args.count, tuple(args.octaves), tuple(args.tempo_range), args.seed,
                                      args.sample_rate)
        except ValueError as err:
            parser.error(str(err))
        print(f"wrote {count} labelled {args.concept} clips and labels.csv to {args.out}")
        return 0
    try:
        positive, negative = write_contrast_sets(args.out, args.count, args.duration, args.notes_per_second, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.count} clips each to {positive} and {negative}")
    return 0
