"""EmotionReward: value/label rewards, 3 s chunking, prompt validation, checkpoint loading, frozen classifier."""

import math

import pytest
import torch

from rlmusic_pl.data.audio import _mel_basis, log_mel, resample
from rlmusic_pl.rewards.base import RewardError
from rlmusic_pl.rewards.emotion import (
    EMOPIA_SAMPLE_RATE,
    EMOTIONS,
    EmotionReward,
    ShortChunkResNet,
    emopia_mel_config,
    emotion_index,
)

SR = 16000
TINY = 8  # classifier width for fast tests


def sines(seconds: float, freqs=(220.0, 330.0, 440.0, 660.0), sample_rate: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    # A decaying envelope and a harmonic make the clips differ beyond their pitch.
    return torch.stack([0.4 * torch.sin(2 * math.pi * f * t) * torch.exp(-t * (i + 1)) + 0.1 * torch.sin(4 * math.pi * f * t)
                        for i, f in enumerate(freqs)])


PROMPTS = ["happy piano", "angry piano", "sad piano", "tender piano"]
ATTRIBUTES = [{"emotion": "happy"}, {"emotion": "Q2"}, {"emotion": "SAD"}, {"emotion": "q4"}]
TARGETS = torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope="module")
def reward():
    return EmotionReward(n_channels=TINY, seed=0)


def test_emotion_names_and_quadrants_map_to_classes():
    assert [emotion_index(v) for v in ("Happy", "ANGRY", "sad", "tender")] == [0, 1, 2, 3]
    assert [emotion_index(v) for v in ("Q1", "q2", " Q3 ", "q4")] == [0, 1, 2, 3]
    assert emotion_index("joyful") is None


def test_value_reward_is_target_minus_predicted_probability(reward):
    waves = sines(2.0)
    values = reward.evaluate(waves, SR, PROMPTS, ATTRIBUTES).total
    probs = reward.probabilities(waves, SR)
    assert probs.shape == (4, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    expected = torch.stack([probs[i, TARGETS[i]] - probs[i].max() for i in range(4)])
    torch.testing.assert_close(values, expected)
    assert (values <= 0).all() and (values >= -1).all()
    # Zero exactly where the target is the predicted class; the four targets differ, so some miss.
    assert torch.equal(values == 0, probs.argmax(1) == TARGETS)
    assert (values < 0).any()


def test_label_reward_is_one_exactly_where_argmax_hits_the_target():
    label = EmotionReward(n_channels=TINY, seed=0, mode="label")
    waves = sines(2.0)
    predicted = label.predict(waves, SR)
    # Targets: the predicted class for clips 0 and 2, another class for clips 1 and 3.
    targets = [int(c) if i % 2 == 0 else (int(c) + 1) % 4 for i, c in enumerate(predicted)]
    attributes = [{"emotion": EMOTIONS[t]} for t in targets]
    values = label.evaluate(waves, SR, PROMPTS, attributes).total
    assert values.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_seven_seconds_are_three_chunks_and_probabilities_their_mean(reward):
    waves = sines(7.0, freqs=(220.0, 440.0))
    seen = {}
    handle = reward.classifier.register_forward_hook(lambda module, args, out: seen.update(mels=args[0], logits=out))
    try:
        probs = reward.probabilities(waves, SR)
    finally:
        handle.remove()
    assert seen["logits"].shape == (2 * 3, 4)
    torch.testing.assert_close(probs, seen["logits"].softmax(-1).reshape(2, 3, 4).mean(1))
    # The chunks are consecutive 3 s slices at 22,050 Hz, the last one zero-padded.
    resampled = resample(waves, SR, EMOPIA_SAMPLE_RATE)
    chunk = 3 * EMOPIA_SAMPLE_RATE
    padded = torch.nn.functional.pad(resampled, (0, 3 * chunk - resampled.shape[1]))
    expected = log_mel(padded.reshape(6, chunk), emopia_mel_config())
    torch.testing.assert_close(seen["mels"], expected)


def test_short_clip_is_one_padded_chunk(reward):
    seen = {}
    handle = reward.classifier.register_forward_hook(lambda module, args, out: seen.update(logits=out))
    try:
        reward.probabilities(sines(1.0, freqs=(220.0,)), SR)
    finally:
        handle.remove()
    assert seen["logits"].shape == (1, 4)


@pytest.mark.parametrize(
    "attributes, found",
    [([{"emotion": "happy"}, {}], "no 'emotion' attribute"), ([{"emotion": "happy"}, {"emotion": "joyful"}], "emotion='joyful'")],
)
def test_missing_or_unknown_emotion_names_prompt_and_allowed_values(reward, attributes, found):
    with pytest.raises(RewardError) as err:
        reward.evaluate(sines(1.0, freqs=(220.0, 440.0)), SR, ["ok prompt", "bad prompt"], attributes)
    message = str(err.value)
    assert "'bad prompt'" in message and found in message
    assert "happy, angry, sad, tender" in message and "Q1" in message


def test_attribute_key_is_configurable():
    reward = EmotionReward(n_channels=TINY, attribute="mood")
    values = reward.evaluate(sines(1.0, freqs=(220.0,)), SR, ["p"], [{"mood": "sad"}]).total
    assert values.shape == (1,)


def lightning_style_checkpoint(reward: EmotionReward, fb: torch.Tensor | None = None) -> dict:
    """The layout of EMOPIA's checkpoints: Lightning's {"state_dict": {"model.<key>": ...}} plus front-end buffers."""
    state = {f"model.{key}": value.clone() for key, value in reward.classifier.state_dict().items()}
    state["model.spec.mel_scale.fb"] = _mel_basis(emopia_mel_config()).T.clone() if fb is None else fb
    state["model.spec.spectrogram.window"] = torch.hann_window(1024)
    return {"state_dict": state, "epoch": 3}


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, reward):
    path = tmp_path / "emopia.ckpt"
    torch.save(lightning_style_checkpoint(reward), path)
    loaded = EmotionReward(checkpoint=str(path), n_channels=TINY, seed=1)
    other = EmotionReward(n_channels=TINY, seed=1)
    waves = sines(2.0)
    torch.testing.assert_close(loaded.probabilities(waves, SR), reward.probabilities(waves, SR), rtol=0, atol=0)
    assert not torch.allclose(other.probabilities(waves, SR), reward.probabilities(waves, SR))


def test_plain_state_dict_with_module_prefix_loads(tmp_path, reward):
    path = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in reward.classifier.state_dict().items()}, path)
    loaded = EmotionReward(checkpoint=str(path), n_channels=TINY, seed=1)
    waves = sines(1.0)
    torch.testing.assert_close(loaded.probabilities(waves, SR), reward.probabilities(waves, SR), rtol=0, atol=0)


def test_checkpoint_is_loaded_once(tmp_path, reward, monkeypatch):
    path = tmp_path / "emopia.ckpt"
    torch.save(lightning_style_checkpoint(reward), path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(args) or real_load(*args, **kwargs))
    loaded = EmotionReward(checkpoint=str(path), n_channels=TINY)
    for _ in range(3):
        loaded.evaluate(sines(1.0), SR, PROMPTS, ATTRIBUTES)
    assert len(calls) == 1


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(RewardError, match="nowhere.ckpt: no such file"):
        EmotionReward(checkpoint=str(tmp_path / "nowhere.ckpt"), n_channels=TINY)


def test_mismatched_width_names_file_and_checkpoint_width(tmp_path, reward):
    path = tmp_path / "narrow.ckpt"
    torch.save(lightning_style_checkpoint(reward), path)
    with pytest.raises(RewardError) as err:
        EmotionReward(checkpoint=str(path), n_channels=16)
    assert str(path) in str(err.value) and "n_channels=8" in str(err.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path, reward):
    state = dict(reward.classifier.state_dict())
    state.pop("dense2.bias")
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(RewardError, match=r"missing keys \['dense2.bias'\]; unexpected keys \['head.weight'\]"):
        EmotionReward(checkpoint=str(path), n_channels=TINY)


def test_front_end_mismatch_is_reported(tmp_path, reward):
    path = tmp_path / "other_fmax.ckpt"
    torch.save(lightning_style_checkpoint(reward, fb=_mel_basis(emopia_mel_config(f_max=11025.0)).T), path)
    with pytest.raises(RewardError, match="mel filter bank"):
        EmotionReward(checkpoint=str(path), n_channels=TINY)
    EmotionReward(checkpoint=str(path), n_channels=TINY, f_max=11025.0)  # the matching front end loads


def test_loud_audio_under_float16_autocast_stays_finite(reward):
    loud = 0.9 * torch.sin(2 * math.pi * 440.0 * torch.arange(2 * SR) / SR)[None]
    with torch.autocast("cpu", dtype=torch.float16):
        probs = reward.probabilities(loud, SR)
    torch.testing.assert_close(probs, reward.probabilities(loud, SR))


def test_classifier_stays_frozen_in_eval_mode(reward):
    waves = sines(1.0)
    before = reward.probabilities(waves, SR)
    reward.train()
    assert not reward.classifier.training and not reward.classifier.spec_bn.training
    assert not any(p.requires_grad for p in reward.parameters())
    torch.testing.assert_close(reward.probabilities(waves, SR), before, rtol=0, atol=0)


def test_emopia_parameter_names_and_shapes():
    state = ShortChunkResNet(n_channels=128).state_dict()
    assert state["spec_bn.weight"].shape == (1,)
    assert state["layer1.conv_1.weight"].shape == (128, 1, 3, 3)
    assert state["layer3.conv_3.weight"].shape == (256, 128, 3, 3)
    assert state["layer7.bn_3.running_var"].shape == (512,)
    assert state["dense1.weight"].shape == (512, 512) and state["bn.running_mean"].shape == (512,)
    assert state["dense2.weight"].shape == (4, 512)


def test_prompts_are_checked_before_any_audio_for_the_attribute_and_its_value(reward):
    assert reward.required_attributes == {"emotion"}
    reward.check_prompts(PROMPTS, ATTRIBUTES)
    with pytest.raises(RewardError, match="prompt 'joyful piano' has emotion='joyful'; expected one of happy"):
        reward.check_prompts(["joyful piano"], [{"emotion": "joyful"}])
