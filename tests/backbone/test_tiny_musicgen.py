"""The tiny MusicGen preset: offline, deterministic by seed, with the real model's codec arithmetic."""

import pytest
import torch

from rlmusic_pl.backbone.tiny_musicgen import CODEBOOK_SIZE, NUM_CODEBOOKS, SAMPLE_RATE, build_tiny_musicgen


def test_same_seed_same_weights_other_seed_other_weights():
    first, _ = build_tiny_musicgen(seed=0)
    again, _ = build_tiny_musicgen(seed=0)
    other, _ = build_tiny_musicgen(seed=1)
    pairs = list(zip(first.state_dict().values(), again.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_codec_gives_four_codebooks_at_fifty_frames_per_second():
    model, processor = build_tiny_musicgen()
    codes = model.audio_encoder.encode(torch.zeros(1, 1, SAMPLE_RATE), bandwidth=1.0).audio_codes
    assert codes.shape[-2:] == (NUM_CODEBOOKS, 50)
    assert model.decoder.num_codebooks == NUM_CODEBOOKS and model.config.decoder.vocab_size == CODEBOOK_SIZE
    assert processor.feature_extractor.sampling_rate == SAMPLE_RATE == model.config.audio_encoder.sampling_rate


def test_generate_runs_offline_with_the_tokenizer_built_in_memory():
    model, processor = build_tiny_musicgen()
    inputs = processor(text=["a bright C note", "a dull G note at 90 bpm"], padding=True, return_tensors="pt")
    audio = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert audio.shape[:2] == (2, 1) and torch.isfinite(audio).all()


def test_sizes_are_configurable_and_the_bandwidth_follows_them():
    model, processor = build_tiny_musicgen(
        hidden_size=32, num_layers=1, sample_rate=8000, codebook_size=64, num_codebooks=3, upsampling_ratios=(8, 5, 4)
    )
    codes = model.audio_encoder.encode(torch.zeros(1, 1, 8000)).audio_codes
    assert codes.shape[-2:] == (3, 50)
    assert model.decoder.num_codebooks == 3 and model.config.decoder.vocab_size == 64 == model.generation_config.pad_token_id
    assert model.config.decoder.hidden_size == 32 and model.config.decoder.num_hidden_layers == 1
    assert processor.feature_extractor.sampling_rate == 8000


def test_a_sample_rate_that_is_not_a_multiple_of_the_hop_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of the hop"):
        build_tiny_musicgen(sample_rate=8100, upsampling_ratios=(8, 5, 4))
