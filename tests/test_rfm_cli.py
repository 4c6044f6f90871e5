"""The MusicRFM workflow end to end through the CLI, on the tiny configs: synthesize concepts, fit directions, predict a sweep."""

import json
from pathlib import Path

import pytest

from rlmusic_pl.cli import main
from rlmusic_pl.data.synthetic import PITCH_CLASSES
from rlmusic_pl.data.synthetic import main as synthesize
from rlmusic_pl.steering.directions import ConceptDirections

ROOT = Path(__file__).resolve().parents[1]
TINY_NOTE = str(ROOT / "configs" / "tiny" / "rfm_note.yaml")
TINY_NOTE_SWEEP = str(ROOT / "configs" / "tiny" / "rfm_note_sweep.yaml")


@pytest.mark.slow
def test_synthesize_fit_predict_on_the_tiny_note_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/, checkpoints/) land in the test's directory
    assert synthesize(["runs/concepts/tiny_notes", "--concept", "notes", "--octaves", "4", "--duration", "0.5"]) == 0

    main(args=["fit", "--config", TINY_NOTE, "--trainer.enable_progress_bar=false", "--model.search_trials=1", "--model.rfm_iters=2"])
    directions = ConceptDirections.load(tmp_path / "checkpoints" / "tiny_rfm_note")
    assert sorted(directions.concepts) == sorted(PITCH_CLASSES)
    assert directions.method == "rfm" and directions.label == "pitch_class" and directions.backbone == "tiny"
    assert directions.scores.shape == (12, len(directions.layers))
    assert list((tmp_path / "runs" / "tiny_rfm_note").rglob("directions_linear"))  # the baseline beside it

    main(args=["predict", "--config", TINY_NOTE_SWEEP, "--trainer.enable_progress_bar=false"])
    rows = json.loads((tmp_path / "runs" / "tiny_rfm_note_sweep" / "sweep" / "table.json").read_text())
    assert len(rows) == 2 * 2 * 3  # prompts x seeds x coefficients
    assert sorted({r["strength"] for r in rows}) == [-4.0, 0.0, 4.0]
    for row in rows:
        assert row["target_note_accuracy"] in (0.0, 1.0) and "text_adherence" in row and row["attribute.steer_concept"] == "E"
