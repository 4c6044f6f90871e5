"""make-preferences: Bradley-Terry labels at a temperature, the temperature for an agreement, the CLI end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from rlmusic_pl.data.preferences import PreferencePairs
from rlmusic_pl.preference_sets import (
    PreferenceSetError,
    expected_agreement,
    label_pairs,
    load_judge,
    temperature_for_agreement,
)


def test_expected_agreement_and_the_temperature_that_reaches_it():
    gaps = torch.tensor([1.0, -2.0, 0.5])
    by_hand = (1 / (1 + math.exp(-1.0 / 0.5)) + 1 / (1 + math.exp(-2.0 / 0.5)) + 1 / (1 + math.exp(-0.5 / 0.5))) / 3
    assert expected_agreement(gaps, 0.5) == pytest.approx(by_hand, rel=1e-6)
    temperature = temperature_for_agreement(gaps, 0.85)
    assert expected_agreement(gaps, temperature) == pytest.approx(0.85, abs=1e-5)
    with pytest.raises(PreferenceSetError, match="same score"):
        temperature_for_agreement(torch.zeros(3), 0.85)
    with pytest.raises(PreferenceSetError, match=r"--agreement must be in \(0.5, 1\)"):
        temperature_for_agreement(gaps, 1.0)


def test_labels_follow_the_bradley_terry_model_of_the_scores():
    scores = torch.tensor([0.0, 1.0, 0.0, 0.2])
    groups = [[0, 1], [2, 3]] * 4000
    generator = torch.Generator().manual_seed(0)
    labels = label_pairs(scores, groups, temperature=0.5, generator=generator)
    first = sum(pair == (1, 0) for pair in labels[0::2]) / 4000
    second = sum(pair == (3, 2) for pair in labels[1::2]) / 4000
    assert first == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)  # sigma(1 / 0.5)
    assert second == pytest.approx(1 / (1 + math.exp(-0.4)), abs=0.02)
    assert all(set(pair) in ({0, 1}, {2, 3}) for pair in labels)
    cold = label_pairs(scores, [[0, 1, 2, 3]], temperature=1e-6, generator=generator)
    assert all(scores[chosen] >= scores[rejected] for chosen, rejected in cold) and len(cold) == 6


def test_the_judge_is_built_from_its_class_path():
    assert load_judge("rlmusic_pl.rewards.LoudnessReward", {"target_db": -20.0}).target_db == -20.0
    with pytest.raises(PreferenceSetError, match="not an importable class path"):
        load_judge("rlmusic_pl.rewards.NoSuchReward")
    with pytest.raises(PreferenceSetError, match="cannot be built"):
        load_judge("rlmusic_pl.rewards.LoudnessReward", {"volume": 1})


def test_make_preferences_cli_writes_a_set_the_data_reads(tmp_path):
    out = tmp_path / "set"
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "an angry drum", "mood": "angry"}\n')
    run = subprocess.run([sys.executable, "-m", "rlmusic_pl", "make-preferences", str(out), "--prompt", "a calm piano",
                          "--prompt-file", str(tmp_path / "prompts.jsonl"), "-k", "3", "--agreement", "0.8",
                          "--duration", "0.5", "--steps", "3", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote 6 pairs of 2 prompts x 3 clips" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expected_agreement"] == pytest.approx(0.8, abs=1e-4) and summary["pairs"] == 6
    clips = [json.loads(line) for line in (out / "clips.jsonl").read_text().splitlines()]
    assert len(clips) == 6 and all((out / clip["file"]).is_file() for clip in clips)
    items = PreferencePairs(str(out / "pairs.jsonl"), duration_s=0.5).items()
    assert len(items) == 6 and items[-1]["attributes"] == {"mood": "angry"}
    bad = subprocess.run([sys.executable, "-m", "rlmusic_pl", "make-preferences", str(tmp_path / "x"), "--prompt", "a",
                          "--temperature", "0.1", "--agreement", "0.8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give exactly one of --temperature and --agreement" in bad.stderr
