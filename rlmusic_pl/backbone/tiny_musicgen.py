"""A tiny random-weight MusicGen built from configs: offline, deterministic by seed, fast on a CPU.

It keeps the real model's interfaces (a T5 text encoder, an EnCodec codec with 4 residual codebooks
at 50 frames per second, a decoder over the delayed codebook streams with ``pad = bos = codebook size``)
at a 16 kHz sample rate. The number of codebooks follows from EnCodec's bandwidth arithmetic,
floor(1000 * bandwidth / (frame_rate * ceil(log2 codebook_size))): 16 kHz, ``upsampling_ratios``
[8, 5, 4, 2] (50 frames/s), codebooks of 32 (5 bits) and a 1 kbps target give 4.

    model, processor = build_tiny_musicgen(seed=0)
"""

from __future__ import annotations

import torch
from transformers import (
    EncodecConfig,
    EncodecFeatureExtractor,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    T5Config,
)

from rlmusic_pl.backbone.tiny import character_tokenizer

SAMPLE_RATE = 16_000
CODEBOOK_SIZE = 32
NUM_CODEBOOKS = 4
TEXT_WIDTH = 32


def tiny_encodec_config() -> EncodecConfig:
    """A 183k-parameter EnCodec: 16 kHz mono, 50 frames/s, 4 codebooks of 32 entries."""
    return EncodecConfig(
        sampling_rate=SAMPLE_RATE, audio_channels=1, target_bandwidths=[1.0], upsampling_ratios=[8, 5, 4, 2],
        codebook_size=CODEBOOK_SIZE, codebook_dim=32, hidden_size=32, num_filters=4, num_residual_layers=1,
        num_lstm_layers=1, normalize=False,
    )


def tiny_decoder_config(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4) -> MusicgenDecoderConfig:
    """The decoder over 4 delayed codebook streams; its vocabulary is the codebook (pad = bos = 32)."""
    return MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE, num_codebooks=NUM_CODEBOOKS, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, ffn_dim=4 * hidden_size, max_position_embeddings=1024, dropout=0.0,
        pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE, audio_channels=1,
    )


def tiny_text_encoder_config() -> T5Config:
    return T5Config(vocab_size=100, d_model=TEXT_WIDTH, d_ff=2 * TEXT_WIDTH, d_kv=16, num_heads=2, num_layers=1)


def tiny_processor(max_length: int = 64) -> MusicgenProcessor:
    """The character-level T5 tokenizer (built in memory) and a 16 kHz EnCodec feature extractor."""
    return MusicgenProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE), character_tokenizer(max_length))


def build_tiny_musicgen(
    seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """Build the tiny MusicGen and its processor; the same arguments always give the same weights.

    Args:
        seed: seed of the random weights.
        hidden_size: decoder width (the text encoder stays 32 wide and is projected).
        num_layers: decoder layers.
        num_heads: decoder attention heads.
    """
    config = MusicgenConfig(
        text_encoder=tiny_text_encoder_config().to_dict(),
        audio_encoder=tiny_encodec_config().to_dict(),
        decoder=tiny_decoder_config(hidden_size, num_layers, num_heads).to_dict(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration(config)
    # A fresh model's generation config lacks what the hub checkpoints set.
    model.generation_config.decoder_start_token_id = CODEBOOK_SIZE
    model.generation_config.pad_token_id = CODEBOOK_SIZE
    model.generation_config.guidance_scale = 3.0
    model.generation_config.do_sample = True
    model.eval()
    return model, tiny_processor()
