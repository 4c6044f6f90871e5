"""A tiny random-weight AudioLDM2 built from configs: offline, deterministic by seed, seconds on a CPU.

It keeps the real model's interfaces (16 kHz audio, 64 mel bins, hop 160, 8 latent channels, VAE
scale factor 4, GPT-2 + T5 conditioning) so that everything the library does with the full model
can be exercised in tests. Tokenizers are built from in-memory vocabularies: a byte-level Roberta
tokenizer with no merges for CLAP, and a character-level unigram T5 tokenizer.
"""

from __future__ import annotations

import string

import torch
from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL, DDIMScheduler
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

WIDTH = 32  # hidden size shared by the tiny text encoders and language model
TEXT_LENGTH = 64


def byte_level_tokenizer(max_length: int = TEXT_LENGTH) -> RobertaTokenizer:
    """A Roberta (byte-level BPE) tokenizer whose vocabulary is the 256 byte symbols and no merges."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(ByteLevel.alphabet()) + ["<mask>"])}
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def character_tokenizer(max_length: int = TEXT_LENGTH) -> T5Tokenizer:
    """A T5 (unigram) tokenizer over single characters, so any English prompt tokenizes offline."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_clap_model(projection_dim: int = WIDTH) -> ClapModel:
    """A two-layer CLAP (text and audio towers) with mono patch embedding."""
    text = ClapTextConfig(
        vocab_size=262, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=TEXT_LENGTH + 2, projection_dim=projection_dim,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )
    audio = ClapAudioConfig(
        spec_size=64, window_size=4, num_mel_bins=64, patch_size=4, patch_stride=4, depths=[1, 1],
        num_attention_heads=[2, 2], hidden_size=WIDTH * 2, intermediate_size=2 * WIDTH,
        patch_embeds_hidden_size=WIDTH // 2, projection_dim=projection_dim, patch_embed_input_channels=1,
        enable_fusion=False,
    )
    return ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=projection_dim))


def tiny_clap_feature_extractor() -> ClapFeatureExtractor:
    """CLAP features sized for ``tiny_clap_model`` (64 mel bins, 48 kHz input)."""
    return ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=1, fft_window_size=1024)


def tiny_unet() -> AudioLDM2UNet2DConditionModel:
    # Few, wide attention heads: with 8-dim heads a CPU call is ~10x slower.
    return AudioLDM2UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, WIDTH, WIDTH], [None, WIDTH, WIDTH]), attention_head_dim=2, norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    # Three blocks give the real model's scale factor of 4 (64 mel bins -> 16 latent columns).
    # scaling_factor: like the real model's, it gives the latents of music log-mels about unit
    # variance (0.18, diffusers' default, gives std 0.04: data the noise would drown, so a slider
    # trained on it learns nothing about the data).
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        scaling_factor=4.0,
    )


def tiny_vocoder(channels: int = 16, resblock_dilations: tuple[int, ...] = (1,)) -> SpeechT5HifiGan:
    """A small HiFi-GAN: ``channels`` after the input convolution, halved by each of the three upsamplings."""
    # Upsampling rates multiply to the mel hop of 160 samples at 16 kHz.
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=64, sampling_rate=16000, upsample_initial_channel=channels, upsample_rates=[5, 4, 8],
            upsample_kernel_sizes=[10, 8, 16], resblock_kernel_sizes=[3], resblock_dilation_sizes=[list(resblock_dilations)],
            normalize_before=False,
        )
    )
    # HiFi-GAN's own init (std 0.01) makes a random vocoder output ~1e-7 (silence in a 16-bit WAV)
    # that its biases dominate; PyTorch's init without biases gives audio that follows the mel.
    for module in vocoder.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            module.reset_parameters()
            torch.nn.init.zeros_(module.bias)
    return vocoder


def audioldm2_scheduler() -> DDIMScheduler:
    """The DDIM scheduler configuration that ships with cvssp/audioldm2-music."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_tiny_pipeline(seed: int = 0) -> AudioLDM2Pipeline:
    """Build the tiny AudioLDM2 pipeline; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        language_model = GPT2LMHeadModel(GPT2Config(n_embd=WIDTH, n_head=2, n_layer=1, vocab_size=16, n_positions=128, bos_token_id=0, eos_token_id=0))
        language_model.config.max_new_tokens = 8
        components = dict(
            vae=tiny_vae(),
            text_encoder=tiny_clap_model(),
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=100, d_model=WIDTH, d_ff=2 * WIDTH, d_kv=16, num_heads=2, num_layers=1)),
            projection_model=AudioLDM2ProjectionModel(text_encoder_dim=WIDTH, text_encoder_1_dim=WIDTH, langauge_model_dim=WIDTH),
            language_model=language_model,
            tokenizer=byte_level_tokenizer(),
            tokenizer_2=character_tokenizer(),
            feature_extractor=tiny_clap_feature_extractor(),
            unet=tiny_unet(),
            scheduler=audioldm2_scheduler(),
            vocoder=tiny_vocoder(),
        )
    return AudioLDM2Pipeline(**components)
