"""A tiny random-weight MusicGen built from configs: offline, deterministic by seed, fast on a CPU.

It keeps the real model's interfaces (a T5 text encoder, an EnCodec codec with 4 residual codebooks
at 50 frames per second, a decoder over the delayed codebook streams with ``pad = bos = codebook size``)
at a 16 kHz sample rate. The number of codebooks follows from EnCodec's bandwidth arithmetic,
floor(1000 * bandwidth / (frame_rate * ceil(log2 codebook_size))): 16 kHz, ``upsampling_ratios``
[8, 5, 4, 2] (50 frames/s), codebooks of 32 (5 bits) and a 1 kbps target give 4. Other sizes (sample
rate, codebooks, decoder) are arguments; the bandwidth is derived from them
(``benchmarks/train_tiny_musicgen.py`` trains an 8 kHz model with 4 codebooks of 64).

    model, processor = build_tiny_musicgen(seed=0)
    model, processor = build_tiny_musicgen(seed=0, sample_rate=8000, upsampling_ratios=(8, 5, 4), codebook_size=64)
"""

from __future__ import annotations

import math

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
UPSAMPLING_RATIOS = (8, 5, 4, 2)


def tiny_encodec_config(
    sample_rate: int = SAMPLE_RATE, codebook_size: int = CODEBOOK_SIZE, num_codebooks: int = NUM_CODEBOOKS,
    upsampling_ratios: tuple[int, ...] = UPSAMPLING_RATIOS,
) -> EncodecConfig:
    """A small EnCodec (183k parameters by default: 16 kHz mono, 50 frames/s, 4 codebooks of 32 entries).

    The target bandwidth is the one that gives ``num_codebooks`` codebooks of ``codebook_size`` at
    sample_rate / prod(upsampling_ratios) frames per second.
    """
    hop = math.prod(upsampling_ratios)
    if sample_rate % hop:
        raise ValueError(f"sample_rate {sample_rate} is not a multiple of the hop prod({list(upsampling_ratios)}) = {hop}")
    bits = math.ceil(math.log2(codebook_size))
    config = EncodecConfig(
        sampling_rate=sample_rate, audio_channels=1, target_bandwidths=[num_codebooks * (sample_rate // hop) * bits / 1000],
        upsampling_ratios=list(upsampling_ratios), codebook_size=codebook_size, codebook_dim=32, hidden_size=32,
        num_filters=4, num_residual_layers=1, num_lstm_layers=1, normalize=False,
    )
    if config.num_quantizers != num_codebooks:  # float rounding in EnCodec's bandwidth arithmetic
        raise ValueError(f"EnCodec's bandwidth arithmetic gives {config.num_quantizers} codebooks, not {num_codebooks}")
    return config


def tiny_decoder_config(
    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, codebook_size: int = CODEBOOK_SIZE,
    num_codebooks: int = NUM_CODEBOOKS,
) -> MusicgenDecoderConfig:
    """The decoder over the delayed codebook streams; its vocabulary is the codebook (pad = bos = codebook_size)."""
    return MusicgenDecoderConfig(
        vocab_size=codebook_size, num_codebooks=num_codebooks, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, ffn_dim=4 * hidden_size, max_position_embeddings=1024, dropout=0.0,
        pad_token_id=codebook_size, bos_token_id=codebook_size, audio_channels=1,
    )


def tiny_text_encoder_config() -> T5Config:
    return T5Config(vocab_size=100, d_model=TEXT_WIDTH, d_ff=2 * TEXT_WIDTH, d_kv=16, num_heads=2, num_layers=1)


def tiny_processor(max_length: int = 64, sample_rate: int = SAMPLE_RATE) -> MusicgenProcessor:
    """The character-level T5 tokenizer (built in memory) and an EnCodec feature extractor at ``sample_rate``."""
    return MusicgenProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=sample_rate), character_tokenizer(max_length))


def build_tiny_musicgen(
    seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, sample_rate: int = SAMPLE_RATE,
    codebook_size: int = CODEBOOK_SIZE, num_codebooks: int = NUM_CODEBOOKS, upsampling_ratios: tuple[int, ...] = UPSAMPLING_RATIOS,
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """Build the tiny MusicGen and its processor; the same arguments always give the same weights.

    Args:
        seed: seed of the random weights.
        hidden_size: decoder width (the text encoder stays 32 wide and is projected).
        num_layers: decoder layers.
        num_heads: decoder attention heads.
        sample_rate: the codec's sample rate in Hz.
        codebook_size: codes per codebook (the decoder's vocabulary; its pad/begin token is this number).
        num_codebooks: residual codebooks.
        upsampling_ratios: the codec's strides; sample_rate / their product is the frame rate.
    """
    config = MusicgenConfig(
        text_encoder=tiny_text_encoder_config().to_dict(),
        audio_encoder=tiny_encodec_config(sample_rate, codebook_size, num_codebooks, upsampling_ratios).to_dict(),
        decoder=tiny_decoder_config(hidden_size, num_layers, num_heads, codebook_size, num_codebooks).to_dict(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration(config)
    # A fresh model's generation config lacks what the hub checkpoints set.
    model.generation_config.decoder_start_token_id = codebook_size
    model.generation_config.pad_token_id = codebook_size
    model.generation_config.guidance_scale = 3.0
    model.generation_config.do_sample = True
    model.eval()
    return model, tiny_processor(sample_rate=sample_rate)
