"""The MusicGen backbone: our sampling loop against generate(), teacher-forced log-probs, EnCodec, clear errors."""

import math

import pytest
import torch

from rlmusic_pl.backbone.conditioning import MusicGenConditioning
from rlmusic_pl.backbone.loading import BackboneLoadError
from rlmusic_pl.backbone.musicgen import MusicGenBackbone, delay, delay_pattern, undelay

PROMPTS = ["a bright C note", "a dull G note at 90 bpm", "a bright C note"]
TEXT_LENGTH = 24
FRAMES = 12
POLICY = dict(guidance_scale=3.0, temperature=0.7, top_k=5)


@pytest.fixture(scope="module")
def backbone() -> MusicGenBackbone:
    """The tiny preset with its cross-attention amplified.

    The random preset barely reads its text (greedy codes are the same for every prompt and any
    guidance up to 10), so mistakes in conditioning or guidance would not change its codes.
    """
    backbone = MusicGenBackbone.load("tiny", seed=0, text_length=TEXT_LENGTH)
    for layer in backbone.decoder.model.decoder.layers:
        layer.encoder_attn.out_proj.weight.data *= 20
    return backbone


@pytest.fixture(scope="module")
def cond(backbone) -> MusicGenConditioning:
    return backbone.encode_prompts(PROMPTS)


def generated_codes(backbone: MusicGenBackbone, prompts: list[str], num_frames: int, **generate_args) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate()``'s codes (caught on their way into EnCodec) and its waveforms."""
    caught = []
    decode = backbone.audio_encoder.decode

    def catch(codes, *args, **kwargs):
        caught.append(codes)
        return decode(codes, *args, **kwargs)

    inputs = backbone.processor(text=prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    backbone.audio_encoder.decode = catch
    try:
        audio = backbone.model.generate(**inputs, max_new_tokens=num_frames + backbone.num_codebooks - 1, **generate_args)
    finally:
        del backbone.audio_encoder.decode
    (codes,) = caught
    return codes[0], audio[:, 0]


def sample(backbone, cond, seed: int = 0, **args):
    return backbone.sample(cond, FRAMES, generator=torch.Generator().manual_seed(seed), **{**POLICY, **args})


# ------------------------------------------------------------------------------ against generate()
@pytest.mark.parametrize("guidance_scale", [3.0, 1.5, 1.0])
def test_greedy_codes_and_audio_equal_generate(backbone, cond, guidance_scale):
    expected_codes, expected_audio = generated_codes(backbone, PROMPTS, FRAMES, do_sample=False, guidance_scale=guidance_scale)

    ours = backbone.sample(cond, FRAMES, guidance_scale=guidance_scale, greedy=True)

    assert ours.codes.shape == (3, backbone.num_codebooks, FRAMES)
    assert torch.equal(ours.codes, expected_codes)
    assert torch.equal(backbone.decode(ours.codes), expected_audio)
    assert len(ours.codes.unique()) > 4, "the tiny model must not emit one code everywhere"
    assert not torch.equal(ours.codes[0], ours.codes[1]), "different prompts must give different codes"


def test_sampling_with_the_global_generator_draws_what_generate_draws(backbone, cond):
    torch.manual_seed(5)
    expected, _ = generated_codes(backbone, PROMPTS, FRAMES, do_sample=True, guidance_scale=3.0, temperature=0.7, top_k=5)
    torch.manual_seed(5)
    ours = backbone.sample(cond, FRAMES, **POLICY)
    assert torch.equal(ours.codes, expected)


def test_unconditional_half_is_transformers_null_prompt(cond):
    guided = cond.guided()
    assert len(guided) == 2 * len(cond)
    assert torch.equal(guided[: len(cond)].hidden_states, cond.hidden_states)
    assert not guided.hidden_states[len(cond) :].any() and not guided.attention_mask[len(cond) :].any()


# ------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("policy", [POLICY, dict(guidance_scale=1.0, temperature=1.3, top_k=None), dict(guidance_scale=0.0, temperature=1.0, top_k=3)])
def test_teacher_forced_log_probs_equal_the_sampling_loops(backbone, cond, policy):
    drawn = backbone.sample(cond, FRAMES, generator=torch.Generator().manual_seed(1), **policy)
    scored = backbone.log_probs(drawn.codes, cond, **policy)
    assert scored.log_probs.shape == drawn.codes.shape
    assert torch.isfinite(drawn.log_probs).all() and (drawn.log_probs <= 0).all()
    torch.testing.assert_close(scored.log_probs, drawn.log_probs, rtol=0, atol=1e-5)


def test_greedy_log_probs_are_those_of_the_argmax_codes(backbone, cond):
    drawn = backbone.sample(cond, FRAMES, greedy=True, **POLICY)
    scored = backbone.log_probs(drawn.codes, cond, return_distributions=True, **POLICY)
    torch.testing.assert_close(scored.log_probs, drawn.log_probs, rtol=0, atol=1e-5)
    assert torch.equal(scored.distributions.argmax(-1), drawn.codes)


def test_kv_cache_and_no_cache_paths_agree(backbone, cond):
    cached = sample(backbone, cond, seed=2, use_cache=True)
    uncached = sample(backbone, cond, seed=2, use_cache=False)
    assert torch.equal(cached.codes, uncached.codes)
    torch.testing.assert_close(cached.log_probs, uncached.log_probs, rtol=0, atol=1e-5)


def test_each_sample_is_scored_with_its_own_conditioning(backbone, cond):
    drawn = sample(backbone, cond, seed=3)
    batched = backbone.log_probs(drawn.codes, cond, **POLICY).log_probs
    for i in range(len(cond)):
        alone = backbone.log_probs(drawn.codes[i : i + 1], cond[i : i + 1], **POLICY).log_probs
        torch.testing.assert_close(alone, batched[i : i + 1], rtol=0, atol=1e-5)
    swapped = backbone.log_probs(drawn.codes, cond[torch.tensor([1, 0, 2])], **POLICY).log_probs
    assert not torch.allclose(swapped[:2], batched[:2], atol=1e-3)


def test_one_generator_per_sample_makes_each_sample_independent_of_the_batch(backbone, cond):
    alone = backbone.sample(cond[1:2], FRAMES, generator=[torch.Generator().manual_seed(5)], **POLICY)
    batched = backbone.sample(cond, FRAMES, generator=[torch.Generator().manual_seed(s) for s in (3, 5, 4)], **POLICY)
    assert torch.equal(batched.codes[1], alone.codes[0])
    with pytest.raises(ValueError, match="2 generators for 3 samples"):
        backbone.sample(cond, FRAMES, generator=[torch.Generator(), torch.Generator()], **POLICY)


def test_same_generator_seed_same_sample_other_seed_other_sample(backbone, cond):
    first, again, other = sample(backbone, cond, seed=4), sample(backbone, cond, seed=4), sample(backbone, cond, seed=5)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.codes, other.codes)


def test_full_distributions_are_the_top_k_cut_policy(backbone, cond):
    drawn = sample(backbone, cond, seed=6)
    scored = backbone.log_probs(drawn.codes, cond, return_distributions=True, **POLICY)
    dist = scored.distributions
    assert dist.shape == (*drawn.codes.shape, backbone.codebook_size)
    torch.testing.assert_close(dist.exp().sum(-1), torch.ones(drawn.codes.shape), rtol=0, atol=1e-5)
    assert (torch.isfinite(dist).sum(-1) == POLICY["top_k"]).all()
    assert torch.equal(dist.gather(-1, drawn.codes[..., None])[..., 0], scored.log_probs)
    assert scored.hidden_states is None and backbone.log_probs(drawn.codes, cond, **POLICY).distributions is None


def test_distributions_before_top_k_are_the_uncut_guided_distribution_and_log_probs_stay_cut(backbone, cond):
    drawn = sample(backbone, cond, seed=6)
    uncut = backbone.log_probs(drawn.codes, cond, return_distributions=True, distributions_before_top_k=True, **POLICY)
    without_top_k = backbone.log_probs(drawn.codes, cond, return_distributions=True, **{**POLICY, "top_k": None})
    assert torch.isfinite(uncut.distributions).all()
    torch.testing.assert_close(uncut.distributions, without_top_k.distributions, rtol=0, atol=1e-6)
    assert torch.equal(uncut.log_probs, backbone.log_probs(drawn.codes, cond, **POLICY).log_probs)


def test_hidden_states_are_the_conditional_final_states_that_predict_each_code(backbone, cond):
    drawn = sample(backbone, cond, seed=7)
    scored = backbone.log_probs(drawn.codes, cond, return_hidden_states=True, **POLICY)
    hidden = scored.hidden_states
    assert hidden.shape == (*drawn.codes.shape, backbone.decoder.config.hidden_size)
    # Code (k, f) is predicted at position f + k: codebook k + 1 at frame f - 1 reads the same state.
    assert torch.equal(hidden[:, 1:, :-1], hidden[:, :-1, 1:])
    inputs = delay(drawn.codes, backbone.pad_token)[..., :-1]
    expected, _ = backbone.decoder_forward(inputs, cond)  # no guidance: the conditional half alone
    torch.testing.assert_close(hidden[:, 0], expected[:, :FRAMES], rtol=0, atol=1e-5)


def test_log_probs_are_differentiable(backbone, cond):
    drawn = sample(backbone, cond, seed=8)
    head = backbone.decoder.lm_heads[0].weight
    head.requires_grad_(True)
    try:
        backbone.log_probs(drawn.codes, cond, **POLICY).log_probs.sum().backward()
        assert head.grad is not None and head.grad.abs().sum() > 0
    finally:
        head.requires_grad_(False)
        head.grad = None


def test_delay_pattern_round_trip():
    codes = torch.arange(2 * 3 * 4).view(2, 3, 4)
    tokens = delay(codes, pad_token=99)
    assert tokens.shape == (2, 3, 7)
    assert torch.equal(tokens[0, 1], torch.tensor([99, 99, 4, 5, 6, 7, 99]))
    assert torch.equal(tokens != 99, delay_pattern(3, 4).expand(2, -1, -1))
    assert torch.equal(undelay(tokens[..., 1:], 4), codes)


# ------------------------------------------------------------------------------ audio and shapes
def test_decode_and_encode_audio_shapes(backbone, cond):
    drawn = sample(backbone, cond)
    audio = backbone.decode(drawn.codes)
    samples_per_frame = backbone.sample_rate // backbone.frame_rate
    assert audio.shape == (3, FRAMES * samples_per_frame) and audio.dtype == torch.float32 and torch.isfinite(audio).all()
    codes = backbone.encode_audio(audio[:, : audio.shape[1] - samples_per_frame // 2])
    assert codes.shape == (3, backbone.num_codebooks, FRAMES) and codes.dtype == torch.long
    assert codes.max() < backbone.codebook_size


def test_frames_and_durations(backbone):
    assert (backbone.sample_rate, backbone.frame_rate, backbone.num_codebooks, backbone.codebook_size) == (16000, 50, 4, 32)
    assert backbone.num_frames(2.0) == 100 and backbone.num_frames(0.02) == 1 and backbone.num_frames(1.011) == 51
    assert math.isclose(backbone.duration_s(100), 2.0)


def test_progress_bar_option(backbone, cond, capsys):
    backbone.sample(cond[:1], 3, progress=True)
    assert "sampling codes" in capsys.readouterr().err


# ------------------------------------------------------------------------------ loading
def test_same_seed_same_backbone_other_seed_other_backbone(cond):
    again = MusicGenBackbone.load("tiny", seed=0, text_length=TEXT_LENGTH)
    other = MusicGenBackbone.load("tiny", seed=1, text_length=TEXT_LENGTH)
    assert torch.equal(again.encode_prompts(PROMPTS).hidden_states, cond.hidden_states)
    assert not torch.equal(other.encode_prompts(PROMPTS).hidden_states, cond.hidden_states)


def test_a_saved_directory_loads_the_same_model(backbone, cond, tmp_path):
    backbone.model.save_pretrained(tmp_path)
    backbone.processor.save_pretrained(tmp_path)
    loaded = MusicGenBackbone.load(str(tmp_path), text_length=TEXT_LENGTH)
    assert torch.equal(loaded.encode_prompts(PROMPTS).hidden_states, cond.hidden_states)
    assert torch.equal(loaded.sample(cond, FRAMES, greedy=True).codes, backbone.sample(cond, FRAMES, greedy=True).codes)


def test_bfloat16_backbone_samples_and_scores(cond):
    half = MusicGenBackbone.load("tiny", dtype=torch.bfloat16, text_length=TEXT_LENGTH)
    half_cond = half.encode_prompts(PROMPTS)
    assert half_cond.hidden_states.dtype == torch.bfloat16
    drawn = sample(half, half_cond)
    assert drawn.log_probs.dtype == torch.float32
    torch.testing.assert_close(half.log_probs(drawn.codes, half_cond, **POLICY).log_probs, drawn.log_probs, rtol=0, atol=0.1)
    assert torch.isfinite(half.decode(drawn.codes)).all()


# ------------------------------------------------------------------------------ bad input
def test_unknown_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no_such_model"
    with pytest.raises(BackboneLoadError, match="no_such_model") as info:
        MusicGenBackbone.load(str(missing))
    assert "HF_HUB_OFFLINE" in str(info.value) and "musicgen-small" in str(info.value)


def test_a_directory_that_is_not_musicgen_names_what_is_missing(backbone, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneLoadError, match=r"missing config\.json.*weights.*tokenizer") as info:
        MusicGenBackbone.load(str(empty))
    assert str(empty) in str(info.value)

    model_only = tmp_path / "model_only"
    backbone.model.save_pretrained(model_only)
    with pytest.raises(BackboneLoadError, match=r"missing tokenizer.*feature extractor"):
        MusicGenBackbone.load(str(model_only))

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "musicgen_melody"}')
    with pytest.raises(BackboneLoadError, match="musicgen_melody"):
        MusicGenBackbone.load(str(other))

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(BackboneLoadError, match="file"):
        MusicGenBackbone.load(str(a_file))


def test_bad_prompts_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="at least one prompt"):
        backbone.encode_prompts([])
    with pytest.raises(TypeError, match="list of prompt strings"):
        backbone.encode_prompts("a single string")
    with pytest.raises(TypeError, match="list of prompt strings"):
        backbone.encode_prompts(["fine", None])


def test_durations_shorter_than_one_frame_are_clear_errors(backbone, cond):
    for duration in (0.0, 0.015, -1.0):
        with pytest.raises(ValueError, match="shorter than one frame"):
            backbone.num_frames(duration)
    with pytest.raises(ValueError, match="num_frames"):
        backbone.sample(cond, 0)


def test_bad_policy_and_codes_are_clear_errors(backbone, cond):
    codes = sample(backbone, cond).codes
    with pytest.raises(ValueError, match="temperature"):
        backbone.sample(cond, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        backbone.log_probs(codes, cond, top_k=-1)
    with pytest.raises(ValueError, match="4 codebooks"):
        backbone.log_probs(codes[:, :2], cond)
    with pytest.raises(ValueError, match=r"in \[0, 32\), got values in \[32, 32\]"):
        backbone.log_probs(torch.full_like(codes, 32), cond)
    with pytest.raises(ValueError, match="integers"):
        backbone.decode(codes.float())
    with pytest.raises(ValueError, match="2 samples of codes but 3"):
        backbone.log_probs(codes[:2], cond)
    with pytest.raises(ValueError, match="mono waveforms"):
        backbone.encode_audio(torch.zeros(2, 1, 160))
