"""benchmarks/musicgen_speed.py runs (its side-by-side part, tiny and short) and reports both ratios."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_musicgen_speed_side_by_side_runs():
    command = [
        sys.executable, str(ROOT / "benchmarks" / "musicgen_speed.py"), "--full-size", "none", "--repeats", "1",
        "--batch", "1", "--duration", "0.1", "--text-length", "16",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(a) our sampling loop with log-probs / generate()" in result.stdout
    assert "(b) teacher-forced log-probs / bare decoder forward" in result.stdout
