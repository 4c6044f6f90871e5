"""SynTheory-style labelled concept sets for MusicRFM: notes, intervals and tempos, as a folder of WAVs + ``labels.csv``.

    python -m rlmusic_pl synthesize runs/concepts/notes --concept notes          # 12 pitch classes x octaves x timbres
    python -m rlmusic_pl synthesize runs/concepts/intervals --concept intervals  # 12 intervals x 12 roots x timbres
    python -m rlmusic_pl synthesize runs/concepts/tempos --concept tempos --count 48
    python -m rlmusic_pl synthesize runs/concepts/brightness --concept brightness --count 96 --sample-rate 8000 --duration 0.5

- ``notes``: one held note per clip, every pitch class in every octave of ``octaves`` and every timbre
  (``bright``: harmonics 1/k, ``dull``: 1/k^4); labels ``pitch_class`` (C, C#, ...), ``octave``, ``timbre``.
- ``intervals``: two notes sounding together, the root in octave 4 and the upper note 1-12 semitones
  above; labels ``interval`` (semitones), ``root``, ``timbre``.
- ``tempos``: a note repeated at a tempo (a continuous label for regression), tempos evenly spaced
  over ``tempo_range``, pitch class and timbre drawn by the seed; labels ``tempo_bpm``, ``pitch_class``, ``timbre``.
- ``brightness``: one held note per clip whose harmonics fall off as 1/k^(4 - 3 b), a continuous label
  ``brightness`` b evenly spaced over [0, 1] (0: the ``dull`` timbre, 1: the ``bright`` one; for
  regression), pitch class and octave (of ``octaves``) drawn by the seed; labels ``brightness``,
  ``pitch_class``, ``octave``.

Clips are written at ``sample_rate`` (default 16 kHz; a backbone's codec resamples, but a codec trained
on 8 kHz notes, as the trained tiny MusicGen's, is best fed its own rate and duration).

Clips already written are kept (the content is fixed by the arguments), so a repeated call is cheap;
``labels.csv`` is rewritten atomically. ``ConceptDataModule`` reads such a folder (any folder with a
``file`` column and label columns works).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from rlmusic_pl.data.audio import AUDIOLDM_MEL, atomic_write, write_wav
from rlmusic_pl.data.synthetic import PITCH_CLASSES, ROLLOFF, NoteLabel, midi_frequency, render_note, render_notes

CONCEPTS = ("notes", "intervals", "tempos", "brightness")
TIMBRES = tuple(ROLLOFF)


def note_clips(octaves: tuple[int, ...] = (3, 4, 5)) -> list[tuple[str, dict, NoteLabel]]:
    """(file, labels, note) of every pitch class x octave x timbre."""
    return [
        (f"notes/{PITCH_CLASSES[pc].replace('#', 's')}{octave}_{timbre}.wav",
         {"pitch_class": PITCH_CLASSES[pc], "octave": octave, "timbre": timbre}, NoteLabel(pc, octave, timbre))
        for pc in range(12) for octave in octaves for timbre in TIMBRES
    ]


def interval_clip(root: int, interval: int, timbre: str, duration_s: float, sample_rate: int = AUDIOLDM_MEL.sample_rate) -> torch.Tensor:
    """Root (octave 4) and the note ``interval`` semitones above, together for the whole clip."""
    midi = 60 + root
    notes = [(0.0, duration_s, midi_frequency(midi), 1.0), (0.0, duration_s, midi_frequency(midi + interval), 1.0)]
    return render_notes(notes, duration_s, ROLLOFF[timbre], sample_rate)


def brightness_rolloff(brightness: float) -> float:
    """The harmonic roll-off exponent of ``brightness`` in [0, 1]: 0 is the ``dull`` timbre's, 1 the ``bright`` one's."""
    dull, bright = ROLLOFF["dull"], ROLLOFF["bright"]
    return dull + (bright - dull) * brightness


def write_concept_set(directory: str | Path, concept: str, duration_s: float = 1.0, count: int = 48,
                      octaves: tuple[int, ...] = (3, 4, 5), tempo_range: tuple[float, float] = (60.0, 180.0), seed: int = 0,
                      sample_rate: int = AUDIOLDM_MEL.sample_rate) -> int:
    """Write the ``concept`` set into ``directory`` (see the module doc); returns the number of clips."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {CONCEPTS}, got {concept!r}")
    if duration_s <= 0 or count < 1 or not octaves or not 0 < tempo_range[0] <= tempo_range[1] or sample_rate < 1:
        raise ValueError(f"duration, count, octaves, the tempo range and the sample rate must be positive, got {duration_s}, {count}, "
                         f"{octaves}, {tempo_range}, {sample_rate}")
    directory = Path(directory)
    rows: list[dict] = []
    for file, labels, render in concept_clips(concept, duration_s, count, octaves, tempo_range, seed, sample_rate):
        if not (directory / file).is_file():
            write_wav(directory / file, render(), sample_rate)
        rows.append({"file": file, **labels})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(directory / "labels.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))
    return len(rows)


def concept_clips(concept: str, duration_s: float, count: int, octaves: tuple[int, ...], tempo_range: tuple[float, float], seed: int,
                  sample_rate: int = AUDIOLDM_MEL.sample_rate):
    """(file, labels, render) of every clip of the set; ``render()`` makes its waveform."""
    if concept == "notes":
        return [(file, labels, lambda note=note: render_note(note, duration_s, sample_rate)) for file, labels, note in note_clips(octaves)]
    if concept == "intervals":
        return [
            (f"intervals/{interval:02d}_{PITCH_CLASSES[root].replace('#', 's')}_{timbre}.wav",
             {"interval": interval, "root": PITCH_CLASSES[root], "timbre": timbre},
             lambda root=root, interval=interval, timbre=timbre: interval_clip(root, interval, timbre, duration_s, sample_rate))
            for interval in range(1, 13) for root in range(12) for timbre in TIMBRES
        ]
    generator = torch.Generator().manual_seed(seed)
    if concept == "brightness":
        return brightness_clips(count, octaves, generator, duration_s, sample_rate)
    low, high = tempo_range
    tempos = [low + (high - low) * i / max(1, count - 1) for i in range(count)]
    pitch_classes = torch.randint(12, (count,), generator=generator).tolist()
    timbres = [TIMBRES[i] for i in torch.randint(len(TIMBRES), (count,), generator=generator).tolist()]
    clips = []
    for index, (tempo, pc, timbre) in enumerate(zip(tempos, pitch_classes, timbres)):
        note = NoteLabel(pc, 4, timbre, round(tempo, 2))
        clips.append((f"tempos/{index:03d}_{note.tempo_bpm:g}bpm.wav", {"tempo_bpm": f"{note.tempo_bpm:g}", "pitch_class": note.name,
                      "timbre": timbre}, lambda note=note: render_note(note, duration_s, sample_rate)))
    return clips


def brightness_clips(count: int, octaves: tuple[int, ...], generator: torch.Generator, duration_s: float, sample_rate: int):
    """(file, labels, render) of ``count`` held notes, brightness evenly spaced over [0, 1] (see the module doc)."""
    pitch_classes = torch.randint(12, (count,), generator=generator).tolist()
    note_octaves = [octaves[i] for i in torch.randint(len(octaves), (count,), generator=generator).tolist()]
    clips = []
    for index, (pc, octave) in enumerate(zip(pitch_classes, note_octaves)):
        brightness = round(index / max(1, count - 1), 4)
        frequency = NoteLabel(pc, octave).frequency
        clips.append((f"brightness/{index:03d}_{brightness:g}.wav",
                      {"brightness": f"{brightness:g}", "pitch_class": PITCH_CLASSES[pc], "octave": octave},
                      lambda f=frequency, b=brightness: render_notes([(0.0, duration_s, f, 1.0)], duration_s, brightness_rolloff(b), sample_rate)))
    return clips
