import numpy as np
import pytest
import torch

from rlmusic_pl.modules.advantages import PerPromptStatTracker, batch_advantages, group_advantages


def reference_advantages(history: dict[str, list[float]], prompts, rewards, buffer_size, min_count):
    """DDPO's per-prompt normalisation written out plainly (history is mutated like the tracker's)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for prompt in set(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        history.setdefault(prompt, [])
        history[prompt] = (history[prompt] + rewards[idx].tolist())[-buffer_size:]
        if len(history[prompt]) < min_count:
            mean, std = rewards.mean(), rewards.std()
        else:
            mean, std = np.mean(history[prompt]), np.std(history[prompt])
        out[idx] = (rewards[idx] - mean) / (std + 1e-6)
    return out


def test_tracker_matches_reference_including_min_count_fallback():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    history: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for _ in range(5):
        prompts = ["a", "b", "a", "c"]
        rewards = rng.normal(size=4)
        expected = reference_advantages(history, prompts, rewards, 4, 3)
        got = tracker.update(prompts, torch.tensor(rewards, dtype=torch.float32))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_first_batch_uses_batch_statistics_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = tracker.update(["a", "a", "b", "b"], rewards)
    expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(got, expected)


def test_tracker_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a", "b"], torch.tensor([1.0, 2.0]))
    restored = PerPromptStatTracker(buffer_size=3, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    batch = (["a", "b", "a"], torch.tensor([0.5, 1.5, 2.5]))
    torch.testing.assert_close(restored.update(*batch), tracker.update(*batch))


def test_group_advantages_normalise_each_group_on_its_own():
    rewards = torch.tensor([1.0, 3.0, 10.0, 30.0])
    got = group_advantages(rewards, group_size=2)
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_batch_advantages_have_zero_mean_unit_std():
    got = batch_advantages(torch.tensor([1.0, 2.0, 6.0]))
    assert got.mean().abs() < 1e-6 and got.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)


def test_restoring_state_keeps_the_configured_sizes():
    saved = PerPromptStatTracker(buffer_size=4, min_count=2)
    saved.update(["a"] * 3, torch.tensor([1.0, 2.0, 3.0]))
    resumed = PerPromptStatTracker(buffer_size=16, min_count=16)
    resumed.load_state_dict(saved.state_dict())
    assert (resumed.buffer_size, resumed.min_count) == (16, 16)
    assert list(resumed.buffers["a"]) == [1.0, 2.0, 3.0] and resumed.buffers["a"].maxlen == 16
