"""benchmarks/rfm_steering.py end to end on the tiny random preset, with a few clips and one probe trial."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rfm_steering_benchmark_reports_probes_pitch_steering_and_brightness(tmp_path):
    out = tmp_path / "rfm"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "rfm_steering.py"), "tiny", "--out", str(out), "--seeds", "1", "--prompts", "2",
        "--octaves", "4", "--brightness-clips", "8", "--search-trials", "1", "--rfm-iters", "2",
        "--coefficients", "0", "4", "--brightness-coefficients", "-4", "0", "4",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation ROC AUC per layer" in result.stdout and "steering toward E with the rfm direction" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert [row["coefficient"] for row in results["steer_rfm"]] == [0.0, 4.0]
    assert [row["coefficient"] for row in results["steer_brightness"]] == [-4.0, 0.0, 4.0]
    for row in results["steer_rfm"] + results["steer_linear"]:
        assert 0.0 <= row["target_share"] <= 1.0 and 0.0 <= row["adherence"] <= 1.0
    assert len(results["probe_scores"]["notes"]["rfm"]) == 12  # one score row per pitch class
    assert (out / "fit_notes" / "directions").is_dir() and (out / "fit_brightness" / "directions_linear").is_dir()
