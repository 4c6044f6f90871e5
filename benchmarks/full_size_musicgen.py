"""The full-size facebook/musicgen-small and -medium architectures with random weights, for memory and speed checks.

Dimensions are those of the hub checkpoints' configs (DESIGN.md section 10): decoder hidden 1024 with
24 layers and 16 heads (small) or 1536 with 48 layers and 24 heads (medium), FFN 4x hidden, 4
codebooks of 2048; text encoder t5-base; codec facebook/encodec_32khz (32 kHz, 50 frames/s, 2.2 kbps
-> 4 codebooks). The tokenizer is the tiny preset's (local), which is enough for memory and timing.
"""

from __future__ import annotations

import torch
from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5Config

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.backbone.tiny_musicgen import tiny_processor

DECODERS = {"small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16), "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24)}
CODEBOOK_SIZE = 2048


def encodec_32khz_config() -> EncodecConfig:
    return EncodecConfig(
        sampling_rate=32000, audio_channels=1, target_bandwidths=[2.2], upsampling_ratios=[8, 5, 4, 4], codebook_size=CODEBOOK_SIZE,
        codebook_dim=128, hidden_size=128, num_filters=64, num_residual_layers=1, num_lstm_layers=2, normalize=False,
        use_causal_conv=False, norm_type="weight_norm", pad_mode="reflect", chunk_length_s=None, overlap=None,
    )


def t5_base_config() -> T5Config:
    return T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, feed_forward_proj="relu")


def full_size_musicgen(size: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", text_length: int = 64) -> MusicGenBackbone:
    """A random-weight MusicGen of the given size (``small`` or ``medium``), built directly in ``dtype`` on ``device``."""
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE, num_codebooks=4, ffn_dim=4 * DECODERS[size]["hidden_size"], max_position_embeddings=2048,
        pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE, audio_channels=1, **DECODERS[size],
    )
    config = MusicgenConfig(text_encoder=t5_base_config().to_dict(), audio_encoder=encodec_32khz_config().to_dict(), decoder=decoder.to_dict())
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: a float32 copy of medium would need 7 GB more
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MusicgenForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.decoder_start_token_id = CODEBOOK_SIZE
    model.generation_config.pad_token_id = CODEBOOK_SIZE
    return MusicGenBackbone(model, tiny_processor(text_length), text_length=text_length)
