"""SynTheory-style concept sets from ``python -m rlmusic_pl synthesize --concept``."""

import csv

import pytest
import soundfile
import torch

from rlmusic_pl.data.audio import load_audio
from rlmusic_pl.data.synthetic import main, midi_frequency, pitch_class_index
from rlmusic_pl.rewards.simple import SpectralCentroidReward
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


def test_brightness_is_a_continuous_label_that_the_spectral_centroid_follows_at_the_sample_rate_given(tmp_path):
    assert main([str(tmp_path), "--concept", "brightness", "--count", "5", "--octaves", "3", "4", "--duration", "0.5",
                 "--sample-rate", "8000"]) == 0
    rows = read_rows(tmp_path)
    assert [float(r["brightness"]) for r in rows] == [0, 0.25, 0.5, 0.75, 1]
    assert {int(r["octave"]) for r in rows} <= {3, 4}
    info = soundfile.info(str(tmp_path / rows[0]["file"]))
    assert info.samplerate == 8000 and info.frames == 4000
    waves = torch.stack([load_audio(tmp_path / r["file"], 8000) for r in rows])
    # The centroid in harmonics (Hz over the fundamental) removes the random pitch: it rises with brightness.
    fundamentals = torch.tensor([midi_frequency(12 * (int(r["octave"]) + 1) + pitch_class_index(r["pitch_class"])) for r in rows])
    centroid = SpectralCentroidReward()(waves, 8000, [""] * 5, [{}] * 5) / fundamentals
    assert (centroid.diff() > 0).all()
