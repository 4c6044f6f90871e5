import pytest
import torch

from rlmusic_pl.data.synthetic import (
    PITCH_CLASSES,
    NoteLabel,
    labelled_notes,
    pitch_class_index,
    random_note_labels,
    render_note,
)
from rlmusic_pl.rewards.simple import SpectralCentroidReward


def test_pitch_class_names_parse_to_indices():
    assert [pitch_class_index(name) for name in PITCH_CLASSES] == list(range(12))
    assert pitch_class_index("bb") == pitch_class_index("A#") == 10
    assert pitch_class_index("Db") == 1 and pitch_class_index("11") == 11 and pitch_class_index(7) == 7
    with pytest.raises(ValueError, match="unknown pitch class 'H'"):
        pitch_class_index("H")
    with pytest.raises(ValueError, match="unknown pitch class '12'"):
        pitch_class_index("12")


def test_label_describes_its_clip():
    label = NoteLabel(pitch_class=7, octave=3, brightness="dull", tempo_bpm=90.0)
    assert label.prompt() == "a dull G note at 90 bpm"
    assert label.attributes() == {"pitch_class": "G", "octave": "3", "brightness": "dull", "tempo_bpm": "90"}
    assert NoteLabel(0).prompt() == "a bright C note"
    assert NoteLabel(9, octave=4).frequency == pytest.approx(440.0)
    with pytest.raises(ValueError, match="brightness"):
        NoteLabel(0, brightness="loud")
    with pytest.raises(ValueError, match="pitch_class"):
        NoteLabel(12)


def test_rendered_note_has_its_length_level_and_brightness():
    bright = render_note(NoteLabel(0, brightness="bright"), 0.5)
    dull = render_note(NoteLabel(0, brightness="dull"), 0.5)
    assert bright.shape == (8000,) and bright.abs().max() == pytest.approx(0.5)
    centroid = SpectralCentroidReward().evaluate(torch.stack([bright, dull]), 16000, ["b", "d"], [{}, {}]).total
    assert centroid[0] > 2 * centroid[1]
    # At a tempo the note restarts each beat: 120 bpm in 1 s gives two onsets (energy bursts).
    repeated = render_note(NoteLabel(0, tempo_bpm=120.0), 1.0)
    halves = repeated.view(2, -1)[:, :800].abs().amax(dim=1)
    assert (halves > 0.3).all()


def test_labelled_notes_are_seeded_and_cover_the_choices():
    waves, labels = labelled_notes(64, 0.25, seed=5, sample_rate=8000, octaves=(3,), tempos=(None, 60.0))
    again, labels_again = labelled_notes(64, 0.25, seed=5, sample_rate=8000, octaves=(3,), tempos=(None, 60.0))
    assert waves.shape == (64, 2000) and torch.equal(waves, again) and labels == labels_again
    assert {label.octave for label in labels} == {3}
    assert {label.tempo_bpm for label in labels} == {None, 60.0}
    assert {label.brightness for label in labels} == {"bright", "dull"}
    assert len({label.pitch_class for label in labels}) > 8
    assert labels != random_note_labels(64, torch.Generator().manual_seed(6), octaves=(3,), tempos=(None, 60.0))
