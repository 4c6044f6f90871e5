"""The tempo estimate on metronomic synthetic notes."""

import math

import pytest
import torch

from rlmusic_pl.data.synthetic import NoteLabel, render_note
from rlmusic_pl.rewards.tempo import TempoReward, estimate_tempo


@pytest.mark.parametrize("bpm", [60, 90, 120, 150])
def test_tempo_of_repeated_notes(bpm):
    waves = torch.stack([render_note(NoteLabel(pc, 4, timbre, bpm), 3.0) for pc, timbre in ((0, "bright"), (7, "dull"))])
    assert estimate_tempo(waves, 16_000).tolist() == pytest.approx([bpm, bpm], rel=0.03)


def test_reward_and_short_clips():
    waves = render_note(NoteLabel(2, 4, "bright", 100), 3.0)[None]
    assert float(TempoReward().evaluate(waves, 16_000, ["x"], [{}]).total[0]) == pytest.approx(100, rel=0.03)
    assert float(TempoReward(target=100).evaluate(waves, 16_000, ["x"], [{}]).total[0]) == pytest.approx(0, abs=3)
    assert math.isnan(float(estimate_tempo(torch.zeros(1, 100), 16_000)[0]))
