"""The full-size cvssp/audioldm2-music architecture with random weights, for GPU memory and speed checks.

Dimensions follow the original AudioLDM2 music configuration as converted by diffusers'
``scripts/convert_original_audioldm2_to_diffusers.py``: UNet model_channels 128, channel_mult
(1, 2, 3, 5), 2 res blocks, 32-channel heads, context dims (GPT-2 768, T5-large 1024) plus an extra
self-attention layer; VAE ch 128, ch_mult (1, 2, 4), 8 latent channels; 16 kHz HiFi-GAN on 64 mel
bins; GPT-2 base; flan-t5-large encoder; CLAP text tower (RoBERTa base, 512-d projection).
Tokenizers are the tiny preset's (local), which is enough for timing.
"""

from __future__ import annotations

import torch
from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapModel,
    ClapTextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
)

from rlmusic_pl.backbone.tiny import audioldm2_scheduler, byte_level_tokenizer, character_tokenizer, tiny_clap_feature_extractor


def full_size_unet() -> AudioLDM2UNet2DConditionModel:
    channels = (128, 256, 384, 640)
    return AudioLDM2UNet2DConditionModel(
        sample_size=256, in_channels=8, out_channels=8, block_out_channels=channels, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=[[None, 768, 1024]] * 4, attention_head_dim=[c // 32 for c in channels],
    )


def full_size_pipeline(dtype: torch.dtype = torch.float16) -> AudioLDM2Pipeline:
    language_model = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12))
    language_model.config.max_new_tokens = 8
    clap = ClapModel(ClapConfig(text_config=ClapTextConfig(projection_dim=512).to_dict(),
                                audio_config=ClapAudioConfig(projection_dim=512).to_dict(), projection_dim=512))
    t5 = T5EncoderModel(T5Config(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, feed_forward_proj="gated-gelu", vocab_size=32128))
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(128, 256, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
        normalize_before=False))
    pipeline = AudioLDM2Pipeline(
        vae=vae, text_encoder=clap, text_encoder_2=t5,
        projection_model=AudioLDM2ProjectionModel(text_encoder_dim=512, text_encoder_1_dim=1024, langauge_model_dim=768),
        language_model=language_model, tokenizer=byte_level_tokenizer(77), tokenizer_2=character_tokenizer(128),
        feature_extractor=tiny_clap_feature_extractor(), unet=full_size_unet(), scheduler=audioldm2_scheduler(), vocoder=vocoder,
    )
    return pipeline.to(dtype=dtype)
