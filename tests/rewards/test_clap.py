import math

import pytest
import torch
from transformers import ClapFeatureExtractor

from rlmusic_pl.data.audio import resample
from rlmusic_pl.rewards import CLAPReward, RewardError
from rlmusic_pl.rewards.clap import tiny_clap
from rlmusic_pl.rewards.laion_clap import convert_laion_state_dict, laion_key_to_transformers

SR = 16000
PROMPTS = ["a happy piano solo", "an angry drum loop", "sad strings"]


@pytest.fixture(scope="module")
def reward():
    return CLAPReward(model="tiny")


@pytest.fixture(scope="module")
def waveforms():
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(SR * 2) / SR
    noise = 0.1 * torch.randn(3, SR * 2, generator=generator)
    tones = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in (220, 880, 3000)])
    return noise + tones


def score(reward, waveforms, prompts=None, attributes=None, sample_rate=SR):
    batch = waveforms.shape[0]
    return reward.evaluate(waveforms, sample_rate, prompts or PROMPTS[:batch], attributes or [{}] * batch).total


def test_one_similarity_in_range_per_sample(reward, waveforms):
    values = score(reward, waveforms)
    assert values.shape == (3,) and values.dtype == torch.float32
    assert (values.abs() <= 1).all()
    assert len(set(values.tolist())) == 3  # the tiny model does tell samples apart


def test_is_the_cosine_of_each_text_with_its_own_audio(reward, waveforms):
    text = reward.embed_text(PROMPTS)
    audio = reward.embed_audio(waveforms, SR)
    text, audio = text / text.norm(dim=-1, keepdim=True), audio / audio.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(score(reward, waveforms), (text * audio).sum(dim=-1))


def test_a_samples_reward_does_not_depend_on_the_rest_of_the_batch(reward, waveforms):
    # Normalising the embedding matrix as a whole (the published code) or batch statistics would
    # make sample 0's reward change with the batch size and with the other samples' loudness.
    alone = score(reward, waveforms[:1])
    in_pair = score(reward, waveforms[:2])
    with_loud_neighbours = score(reward, torch.cat([waveforms[:1], 8 * waveforms[1:]]))
    torch.testing.assert_close(in_pair[0], alone[0])
    torch.testing.assert_close(with_loud_neighbours[0], alone[0])


def test_audio_reaches_the_feature_extractor_at_48_khz(reward, waveforms, monkeypatch):
    calls = []
    original = ClapFeatureExtractor.__call__

    def spy(self, raw_speech, *args, **kwargs):
        calls.append(([len(x) for x in raw_speech], kwargs.get("sampling_rate")))
        return original(self, raw_speech, *args, **kwargs)

    monkeypatch.setattr(ClapFeatureExtractor, "__call__", spy)
    score(reward, waveforms[:2, :SR])
    assert calls == [([48000, 48000], 48000)]


def test_the_same_sound_at_another_sample_rate_scores_the_same(reward, waveforms):
    at_16k = score(reward, waveforms, sample_rate=SR)
    at_48k = score(reward, resample(waveforms, SR, 48000), sample_rate=48000)
    torch.testing.assert_close(at_48k, at_16k, atol=2e-3, rtol=0)


def test_rejects_bad_audio(reward, waveforms):
    with pytest.raises(RewardError, match="NaN"):
        broken = waveforms.clone()
        broken[1, 10] = float("nan")
        score(reward, broken)
    with pytest.raises(RewardError, match=r"expected shape \[batch, samples\]"):
        reward.evaluate(waveforms[:, None], SR, PROMPTS, [{}] * 3)
    with pytest.raises(RewardError, match="3 waveforms but 2 prompts"):
        reward.evaluate(waveforms, SR, PROMPTS[:2], [{}] * 3)


def test_reward_text_is_a_template_over_prompt_and_attributes(waveforms):
    by_attribute = CLAPReward(model="tiny", text="a {emotion} piano solo")
    attributes = [{"emotion": "happy"}, {"emotion": "angry"}, {"emotion": "sad"}]
    prompts = ["a happy piano solo", "x", "y"]
    values = score(by_attribute, waveforms, prompts, attributes)
    by_prompt = score(CLAPReward(model="tiny"), waveforms, ["a happy piano solo", "a angry piano solo", "a sad piano solo"])
    torch.testing.assert_close(values, by_prompt)
    with pytest.raises(RewardError, match="'emotion'.*attributes \\['mood'\\]"):
        score(by_attribute, waveforms, prompts, [{"mood": "happy"}] * 3)
    with pytest.raises(ValueError, match="not a valid format string"):
        CLAPReward(model="tiny", text="a {prompt")


def test_the_attributes_the_text_template_names_are_required(reward):
    assert reward.required_attributes == frozenset()
    by_attributes = CLAPReward(model="tiny", text="a {emotion} {instrument!s} for {prompt}")
    assert by_attributes.required_attributes == {"emotion", "instrument"}
    with pytest.raises(RewardError, match=r"needs the prompt attribute\(s\) \['instrument'\], but prompt 'x'"):
        by_attributes.check_prompts(["x"], [{"emotion": "sad"}])


def test_tiny_model_is_deterministic_by_seed(waveforms):
    same = score(CLAPReward(model="tiny", seed=0), waveforms)
    torch.testing.assert_close(same, score(CLAPReward(model="tiny", seed=0), waveforms))
    assert not torch.allclose(same, score(CLAPReward(model="tiny", seed=1), waveforms))


def test_model_is_frozen_and_stays_in_eval_mode(reward):
    reward.train()
    assert not reward.model.training and not any(m.training for m in reward.model.modules())
    assert not any(p.requires_grad for p in reward.parameters())


def test_loads_a_saved_transformers_clap_directory(reward, waveforms, tmp_path):
    model, processor = tiny_clap(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    torch.testing.assert_close(score(CLAPReward(model=str(tmp_path)), waveforms), score(reward, waveforms))


def test_unavailable_model_is_named():
    with pytest.raises(OSError, match="'nobody/no-such-clap'"):
        CLAPReward(model="nobody/no-such-clap")


# --- laion-clap checkpoints -------------------------------------------------------------------


def test_laion_key_names_map_to_transformers():
    # Names as they appear in music_audioset_epoch_15_esc_90.14.pt (after the "module." prefix).
    assert laion_key_to_transformers("audio_branch.layers.1.blocks.0.attn.proj.weight") == (
        "audio_model.audio_encoder.layers.1.blocks.0.attention.output.dense.weight"
    )
    assert laion_key_to_transformers("audio_branch.layers.0.blocks.1.attn.relative_position_bias_table") == (
        "audio_model.audio_encoder.layers.0.blocks.1.attention.self.relative_position_bias_table"
    )
    assert laion_key_to_transformers("audio_branch.layers.2.blocks.3.mlp.fc2.bias") == (
        "audio_model.audio_encoder.layers.2.blocks.3.output.dense.bias"
    )
    assert laion_key_to_transformers("audio_branch.layers.0.blocks.0.norm1.weight") == (
        "audio_model.audio_encoder.layers.0.blocks.0.layernorm_before.weight"
    )
    assert laion_key_to_transformers("audio_branch.bn0.running_var") == "audio_model.audio_encoder.batch_norm.running_var"
    assert laion_key_to_transformers("audio_branch.patch_embed.proj.weight") == (
        "audio_model.audio_encoder.patch_embed.proj.weight"
    )
    assert laion_key_to_transformers("audio_branch.layers.0.downsample.norm.bias") == (
        "audio_model.audio_encoder.layers.0.downsample.norm.bias"
    )
    assert laion_key_to_transformers("text_branch.encoder.layer.11.output.dense.weight") == (
        "text_model.encoder.layer.11.output.dense.weight"
    )
    assert laion_key_to_transformers("text_projection.2.bias") == "text_projection.linear2.bias"
    assert laion_key_to_transformers("audio_projection.0.weight") == "audio_projection.linear1.weight"
    assert laion_key_to_transformers("logit_scale_a") == "logit_scale_a"


def test_fused_qkv_is_split_and_laion_only_parts_are_dropped():
    qkv = torch.arange(12.0).reshape(6, 2)
    converted = convert_laion_state_dict(
        {
            "module.audio_branch.layers.0.blocks.0.attn.qkv.weight": qkv,
            "module.audio_branch.layers.0.blocks.1.attn_mask": torch.zeros(4, 4),
            "module.audio_branch.spectrogram_extractor.stft.conv_real.weight": torch.zeros(1),
            "module.audio_branch.logmel_extractor.melW": torch.zeros(1),
            "module.audio_branch.head.weight": torch.zeros(1),
            "module.text_transform.sequential.0.weight": torch.zeros(1),
        }
    )
    prefix = "audio_model.audio_encoder.layers.0.blocks.0.attention.self."
    assert set(converted) == {prefix + "query.weight", prefix + "key.weight", prefix + "value.weight"}
    torch.testing.assert_close(converted[prefix + "key.weight"], qkv[2:4])


# transformers -> laion-clap names, written independently of the conversion under test.
TO_LAION = [
    ("audio_model.audio_encoder.batch_norm.", "audio_branch.bn0."),
    ("audio_model.audio_encoder.", "audio_branch."),
    (".attention.output.dense.", ".attn.proj."),
    (".attention.self.", ".attn."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    ("_projection.linear1.", "_projection.0."),
    ("_projection.linear2.", "_projection.2."),
]


def to_laion_name(key):
    if key.startswith("text_model."):  # laion's text tower is a transformers RoBERTa already
        return "text_branch." + key.removeprefix("text_model.")
    for old, new in TO_LAION:
        key = key.replace(old, new)
    return key


def to_laion_layout(hf_state_dict):
    """A ClapModel state dict as laion-clap saves it: fused qkv, "module." prefixes, extra laion-only parts."""
    laion = {}
    for key, value in hf_state_dict.items():
        if key.endswith("embeddings.token_type_ids"):
            continue  # older checkpoints do not store it
        name = "module." + to_laion_name(key)
        if ".attn.query." in name:
            parts = [hf_state_dict[key.replace(".query.", f".{part}.")] for part in ("query", "key", "value")]
            laion[name.replace(".query.", ".qkv.")] = torch.cat(parts)
        elif ".attn.key." not in name and ".attn.value." not in name:
            laion[name] = value
    laion["module.audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.randn(513, 1, 1024)
    laion["module.audio_branch.logmel_extractor.melW"] = torch.randn(1024, 64)
    laion["module.audio_branch.tscam_conv.weight"] = torch.randn(3, 3)
    laion["module.audio_transform.sequential.0.weight"] = torch.randn(3, 3)
    return laion


@pytest.fixture(scope="module")
def distinct_reward():
    """A tiny CLAP reward whose every weight is distinct (fresh LayerNorms are all ones: swaps would go unseen)."""
    reward = CLAPReward(model="tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in reward.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand(tensor.shape, generator=generator))  # positive: running_var stays valid
    return reward


@pytest.fixture(scope="module")
def laion_state_dict(distinct_reward):
    return to_laion_layout(distinct_reward.model.state_dict())


def test_laion_checkpoint_round_trip(distinct_reward, waveforms, laion_state_dict, tmp_path):
    path = tmp_path / "music_audioset_epoch_15_esc_90.14.pt"
    torch.save({"epoch": 15, "state_dict": laion_state_dict}, path)
    expected = score(distinct_reward, waveforms)
    assert not torch.allclose(score(CLAPReward(model="tiny", seed=1), waveforms), expected)
    loaded = CLAPReward(model="tiny", seed=1, checkpoint=str(path))
    torch.testing.assert_close(score(loaded, waveforms), expected)


def test_laion_checkpoint_that_does_not_fit_lists_the_keys(laion_state_dict, tmp_path):
    path = tmp_path / "bad.pt"
    state = dict(laion_state_dict)
    del state["module.audio_branch.norm.weight"]
    state["module.audio_branch.surprise.weight"] = torch.zeros(1)
    state["module.text_projection.2.bias"] = torch.zeros(5)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="bad.pt") as info:
        CLAPReward(model="tiny", checkpoint=str(path))
    message = str(info.value)
    assert "missing: audio_model.audio_encoder.norm.weight" in message
    assert "unexpected: audio_model.audio_encoder.surprise.weight" in message
    assert "text_projection.linear2.bias: checkpoint (5,), model (16,)" in message


def test_missing_or_unreadable_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        CLAPReward(model="tiny", checkpoint=str(tmp_path / "nowhere.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable PyTorch file"):
        CLAPReward(model="tiny", checkpoint=str(junk))


def test_checkpoint_with_pickled_objects_is_refused_with_advice(laion_state_dict, tmp_path):
    import argparse

    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": laion_state_dict, "args": argparse.Namespace(amodel="HTSAT-base")}, path)
    with pytest.raises(ValueError, match=r"with_args.pt: holds a argparse.Namespace object.*re-save only its weights"):
        CLAPReward(model="tiny", checkpoint=str(path))


def test_a_clip_of_two_10_s_halves_scores_the_mean_of_the_halves(reward):
    # MusicRL's MuLan use: the similarity averaged over 10 s chunks (here a low tone, then noise).
    t = torch.arange(10 * SR) / SR
    first, second = 0.5 * torch.sin(2 * math.pi * 220 * t), 0.2 * torch.randn(10 * SR, generator=torch.Generator().manual_seed(1))
    halves = score(reward, torch.stack([first, second]), [PROMPTS[0]] * 2)
    assert not torch.isclose(halves[0], halves[1])
    whole = score(reward, torch.cat([first, second])[None], PROMPTS[:1])
    torch.testing.assert_close(whole, halves.mean()[None])
    unchunked = CLAPReward(model="tiny", chunk_seconds=None)
    assert not torch.isclose(score(unchunked, torch.cat([first, second])[None], PROMPTS[:1]), whole)


def test_the_last_chunk_is_the_clips_last_chunk_seconds(reward, monkeypatch):
    seen = []
    monkeypatch.setattr(reward, "embed_audio", lambda chunks, sr: seen.append(chunks) or torch.ones(len(chunks), 16))
    wave = torch.arange(25.0)[None]  # 25 "seconds" at 1 Hz: chunks 0-9, 10-19 and the last ten, 15-24
    score(reward, wave, sample_rate=1)
    torch.testing.assert_close(seen[0], torch.stack([torch.arange(0.0, 10), torch.arange(10.0, 20), torch.arange(15.0, 25)]))
    score(reward, wave[:, :7], sample_rate=1)  # no longer than a chunk: scored whole
    torch.testing.assert_close(seen[1], torch.arange(7.0)[None])
