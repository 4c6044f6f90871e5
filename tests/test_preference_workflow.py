"""The preference workflow through the CLI, as the README gives it: make-preferences -> fit the reward model -> DDPO on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlmusic_pl.rewards import PreferenceReward

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "rlmusic_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_make_preferences_then_the_reward_model_then_ddpo_on_it(tmp_path):
    # The tiny configs' relative paths (runs/tiny_preferences, runs/tiny_preference_rm/reward_model) chain the steps.
    made = run(["make-preferences", "runs/tiny_preferences", "--prompt", "a calm piano", "--prompt", "an angry drum",
                "--prompt", "a happy violin", "-k", "4", "--agreement", "0.85", "--duration", "1", "--steps", "2"], tmp_path)
    assert "wrote 18 pairs" in made.stdout
    run(["fit", "--config", str(ROOT / "configs/tiny/preference_rm.yaml"), "--trainer.max_epochs=3"], tmp_path)
    exported = tmp_path / "runs/tiny_preference_rm/reward_model"
    config = json.loads((exported / "reward_model.json").read_text())
    assert {"val/accuracy", "val/loss", "val/calibration_error"} <= set(config["metrics"])
    reward = PreferenceReward(checkpoint=str(exported))
    assert reward.evaluate(torch.randn(2, 16000) * 0.1, 16000, ["a", "b"], [{}, {}]).total.shape == (2,)

    run(["fit", "--config", str(ROOT / "configs/tiny/ddpo_preference.yaml"), "--trainer.max_epochs=1", "--model.num_steps=2",
         "--model.duration_s=0.5", "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
         "--trainer.logger.init_args.save_dir=runs/tiny_ddpo_preference"], tmp_path)
    metrics = next((tmp_path / "runs/tiny_ddpo_preference").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    assert {"train/kl_to_reference", "train/reward/preference", "train/reward/monitor/judge"} <= set(header)
    assert next((tmp_path / "runs/tiny_ddpo_preference").rglob("adapter/pytorch_lora_weights.safetensors"))
