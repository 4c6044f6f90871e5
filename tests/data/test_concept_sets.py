"""SynTheory-style concept sets from ``python -m rlmusic_pl synthesize --concept``."""

import csv

import pytest

from rlmusic_pl.data.audio import load_audio
from rlmusic_pl.data.synthetic import main
from rlmusic_pl.rewards.pitch import estimate_pitch_class


def read_rows(folder):
    with (folder / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_notes_cover_every_pitch_class_octave_and_timbre_and_sound_as_labelled(tmp_path):
    assert main([str(tmp_path), "--concept", "notes", "--octaves", "3", "4", "--duration", "0.5"]) == 0
    rows = read_rows(tmp_path)
    assert len(rows) == 12 * 2 * 2 and {r["pitch_class"] for r in rows} == {"C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"}
    for row in rows[::7]:
        wave = load_audio(tmp_path / row["file"], 16_000)
        assert wave.shape == (8000,)
        assert ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"][int(estimate_pitch_class(wave[None], 16_000))] == row["pitch_class"]
    written = (tmp_path / rows[0]["file"]).stat().st_mtime_ns
    main([str(tmp_path), "--concept", "notes", "--octaves", "3", "4", "--duration", "0.5"])
    assert (tmp_path / rows[0]["file"]).stat().st_mtime_ns == written  # kept, not rewritten


def test_intervals_and_tempos(tmp_path):
    main([str(tmp_path / "intervals"), "--concept", "intervals", "--duration", "0.2"])
    rows = read_rows(tmp_path / "intervals")
    assert len(rows) == 12 * 12 * 2 and {int(r["interval"]) for r in rows} == set(range(1, 13))
    main([str(tmp_path / "tempos"), "--concept", "tempos", "--count", "5", "--tempo-range", "60", "120", "--duration", "0.2"])
    rows = read_rows(tmp_path / "tempos")
    assert [float(r["tempo_bpm"]) for r in rows] == [60, 75, 90, 105, 120]


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--concept", "chords"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--concept", "tempos", "--count", "0"])
    assert "must be positive" in capsys.readouterr().err
