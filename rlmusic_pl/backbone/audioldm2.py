"""The AudioLDM2 backbone: diffusers components behind the few operations RL fine-tuning needs.

``AudioLDM2Pipeline.__call__`` runs under ``no_grad`` and hides its per-step state, so the library
drives the UNet and a DDIM scheduler itself: prompt encoding to per-sample conditioning, guided
noise prediction, a DDIM step with its log-probability, and the latent <-> mel <-> waveform paths.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline, DDIMScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlmusic_pl.backbone.checkpointing import checkpoint_each
from rlmusic_pl.backbone.conditioning import PromptConditioning, TextConditioning
from rlmusic_pl.backbone.ddim import ddim_step_distribution, ddim_step_with_logprob
from rlmusic_pl.backbone.loading import BackboneLoadError, hub_load_error
from rlmusic_pl.backbone.tiny import build_tiny_pipeline
from rlmusic_pl.data.audio import AUDIOLDM_MEL, log_mel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "cvssp/audioldm2-music"
TINY = "tiny"


@dataclass
class SamplingResult:
    """A batch of denoising trajectories.

    Attributes:
        latents: x_T ... x_0, shape [B, S + 1, C, H, W].
        log_probs: log-probability of each step under the sampling policy, [B, S].
        timesteps: the timestep of each step, [S].
    """

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


def load_pipeline(source: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> AudioLDM2Pipeline:
    """Load an AudioLDM2 pipeline from the preset ``"tiny"``, a local directory, or a hub id."""
    if source == TINY:
        pipeline = build_tiny_pipeline(seed)
        return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
    local = Path(os.path.expanduser(source))
    if local.exists():
        check_pipeline_directory(local)
        try:
            return AudioLDM2Pipeline.from_pretrained(str(local), torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise BackboneLoadError(f"could not load AudioLDM2 from the directory {local}: {err}") from err
    try:
        return AudioLDM2Pipeline.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise hub_load_error("AudioLDM2", source, f"a hub id such as {DEFAULT_MODEL!r}, a diffusers directory, or {TINY!r}", err) from err


def check_pipeline_directory(directory: Path) -> None:
    """BackboneLoadError naming what a saved AudioLDM2 pipeline directory lacks: model_index.json, a field or a component."""
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise BackboneLoadError(f"{directory}: not a diffusers AudioLDM2 directory (no model_index.json)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackboneLoadError(f"{index_file}: not valid JSON ({err})") from err
    if not isinstance(index, dict) or "_class_name" not in index:
        raise BackboneLoadError(
            f'{index_file}: no "_class_name" field (a saved AudioLDM2 pipeline has "_class_name": "AudioLDM2Pipeline")'
        )
    if index["_class_name"] != AudioLDM2Pipeline.__name__:
        raise BackboneLoadError(f"{index_file}: a {index['_class_name']} pipeline, not an {AudioLDM2Pipeline.__name__}")
    components = [name for name in inspect.signature(AudioLDM2Pipeline.__init__).parameters if name != "self"]
    unlisted = [name for name in components if name not in index]
    if unlisted:
        raise BackboneLoadError(f"{index_file}: lists no {', '.join(unlisted)} (every AudioLDM2 component needs an entry)")
    missing = [name for name in components if not (directory / name).is_dir()]
    if missing:
        folders = ", ".join(f"{name}/" for name in missing)
        raise BackboneLoadError(f"{directory}: not a complete AudioLDM2 pipeline, missing the component folder(s) {folders}")


class AudioLDM2Backbone(nn.Module):
    """Frozen AudioLDM2 components with the operations used by the RL and slider modules.

    Args:
        pipeline: a diffusers ``AudioLDM2Pipeline`` (see ``AudioLDM2Backbone.load``).
        text_length: T5 tokens per prompt. Every prompt is padded (masked) to this length so that
            conditioning of different prompts can be stored and batched together.
    """

    def __init__(self, pipeline: AudioLDM2Pipeline, text_length: int = 64) -> None:
        super().__init__()
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.vocoder = pipeline.vocoder
        self.text_encoder = pipeline.text_encoder
        self.text_encoder_2 = pipeline.text_encoder_2
        self.projection_model = pipeline.projection_model
        self.language_model = pipeline.language_model
        self.tokenizer = pipeline.tokenizer
        self.tokenizer_2 = pipeline.tokenizer_2
        self.pipeline = pipeline
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.text_length = text_length
        self.gradient_checkpointing = False
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, source: str = DEFAULT_MODEL, seed: int = 0, dtype: torch.dtype = torch.float32, text_length: int = 64) -> AudioLDM2Backbone:
        """Load from a hub id (default ``cvssp/audioldm2-music``), a local diffusers directory, or ``"tiny"``."""
        return cls(load_pipeline(source, seed=seed, dtype=dtype), text_length=text_length)

    # ----------------------------------------------------------------------------- shapes
    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def num_samples(self, duration_s: float) -> int:
        # round, not int: 1.005 * 16000 is 16079.999... in floating point
        return round(duration_s * self.sample_rate)

    def latent_shape(self, duration_s: float) -> tuple[int, int, int]:
        """(channels, time, frequency) of the latents for ``duration_s`` seconds of audio."""
        # Enough mel frames to cover every requested sample, rounded up to the VAE's factor.
        mel_frames = math.ceil(self.num_samples(duration_s) / AUDIOLDM_MEL.hop_length)
        frames = math.ceil(mel_frames / self.vae_scale_factor)
        return (self.unet.config.in_channels, frames, self.vocoder.config.model_in_dim // self.vae_scale_factor)

    def initial_latents(self, batch: int, duration_s: float, generator: torch.Generator | None = None) -> Tensor:
        """Gaussian x_T for ``batch`` clips of ``duration_s`` seconds (float32, on the UNet's device)."""
        device = self.unet.device
        noise = torch.randn((batch, *self.latent_shape(duration_s)), generator=generator, device=generator.device if generator else device)
        return noise.to(device) * self.scheduler.init_noise_sigma

    # ----------------------------------------------------------------------------- text
    def _clap_text_embeddings(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        features = self.text_encoder.get_text_features(
            tokens.input_ids.to(self.unet.device), attention_mask=tokens.attention_mask.to(self.unet.device)
        )
        features = getattr(features, "pooler_output", features)
        return features[:, None, :]

    def _t5_embeddings(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer_2(prompts, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.unet.device)
        return self.text_encoder_2(tokens.input_ids.to(self.unet.device), attention_mask=mask)[0], mask

    @torch.no_grad()
    def encode_texts(self, prompts: list[str]) -> TextConditioning:
        """Conditioning of one side (prompts only, no negative prompts): what an unguided UNet call reads."""
        return self._encode_side(list(prompts))

    def _encode_side(self, prompts: list[str]) -> TextConditioning:
        # Each distinct text once (a batch repeats prompts k times and shares one negative prompt).
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.unet.device)
        return self._encode_texts(unique).map(lambda t: t[index])

    def _encode_texts(self, prompts: list[str]) -> TextConditioning:
        clap = self._clap_text_embeddings(prompts)
        t5, t5_mask = self._t5_embeddings(prompts)
        projected = self.projection_model(
            hidden_states=clap, hidden_states_1=t5, attention_mask=torch.ones(clap.shape[:2], dtype=torch.long, device=clap.device), attention_mask_1=t5_mask
        )
        generated = self.pipeline.generate_language_model(
            projected.hidden_states, attention_mask=projected.attention_mask, max_new_tokens=self.language_model.config.max_new_tokens
        )
        return TextConditioning(generated=generated, t5=t5, t5_mask=t5_mask)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> PromptConditioning:
        """Per-sample conditioning for ``prompts`` and their negative prompts (default: empty)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts expects a list of prompts, got a single string")
        negative_prompts = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        return PromptConditioning(positive=self._encode_side(list(prompts)), negative=self._encode_side(list(negative_prompts)))

    # ----------------------------------------------------------------------------- denoising
    def predict_noise(self, latents: Tensor, timestep: Tensor, cond: PromptConditioning, guidance_scale: float) -> Tensor:
        """Classifier-free-guided noise prediction; the UNet batch is [negative, positive]."""
        guided = guidance_scale > 1.0
        text = cond.guided() if guided else cond.positive
        model_input = torch.cat([latents, latents]) if guided else latents
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.dim() == 1 and guided:
            timestep = torch.cat([timestep, timestep])
        eps = self.unet_noise(model_input, timestep, text)
        if not guided:
            return eps
        eps_negative, eps_positive = eps.chunk(2)
        return eps_negative + guidance_scale * (eps_positive - eps_negative)

    def unet_noise(self, latents: Tensor, timestep: Tensor, text: TextConditioning) -> Tensor:
        """The UNet's noise prediction for latents [B, ...] conditioned on one side's ``text`` [B] (no guidance)."""
        return self.unet(
            latents,
            timestep,
            encoder_hidden_states=text.generated,
            encoder_hidden_states_1=text.t5,
            encoder_attention_mask_1=text.t5_mask,
            return_dict=False,
        )[0]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each UNet block's activations during the backward pass (less memory, more compute).

        diffusers' own switch is not used: in AudioLDM2's blocks (diffusers 0.42) its checkpointed
        path passes the text attention mask positionally into Transformer2DModel's self-attention
        ``attention_mask`` slot and fails.
        """
        checkpoint_each([*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks])
        self.gradient_checkpointing = True

    def set_timesteps(self, num_steps: int) -> Tensor:
        self.scheduler.set_timesteps(num_steps, device=self.unet.device)
        return self.scheduler.timesteps

    def ddim_step(
        self, noise_pred: Tensor, timestep: Tensor, latents: Tensor, eta: float,
        prev_latents: Tensor | None = None, generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``ddim_step_with_logprob`` with this backbone's scheduler."""
        return ddim_step_with_logprob(self.scheduler, noise_pred, timestep, latents, eta, prev_latents, generator)

    def ddim_distribution(self, noise_pred: Tensor, timestep: Tensor, latents: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """``ddim_step_distribution`` (the step's mean and std) with this backbone's scheduler."""
        return ddim_step_distribution(self.scheduler, noise_pred, timestep, latents, eta)

    @torch.no_grad()
    def sample(
        self,
        cond: PromptConditioning,
        latents: Tensor,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SamplingResult:
        """Run the stochastic DDIM loop from ``latents`` (x_T), recording every step and its log-prob."""
        timesteps = self.set_timesteps(num_steps)
        trajectory, log_probs = [latents], []
        for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
            eps = self.predict_noise(latents, t, cond, guidance_scale)
            latents, log_prob = self.ddim_step(eps, t, latents, eta, generator=generator)
            trajectory.append(latents)
            log_probs.append(log_prob)
        return SamplingResult(latents=torch.stack(trajectory, 1), log_probs=torch.stack(log_probs, 1), timesteps=timesteps)

    # ----------------------------------------------------------------------------- audio
    def latents_to_mel(self, latents: Tensor) -> Tensor:
        """VAE-decode latents to log-mel spectrograms [B, frames, n_mels]."""
        mel = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return mel.squeeze(1)

    def mel_to_waveform(self, mel: Tensor, duration_s: float | None = None) -> Tensor:
        """HiFi-GAN vocoder: log-mel [B, frames, n_mels] -> float32 waveforms [B, T]."""
        wave = self.vocoder(mel.to(self.vocoder.dtype)).float()
        return wave if duration_s is None else wave[:, : self.num_samples(duration_s)]

    def decode(self, latents: Tensor, duration_s: float | None = None) -> Tensor:
        """Latents -> waveforms [B, T] at ``sample_rate``, cut to ``duration_s`` when given."""
        return self.mel_to_waveform(self.latents_to_mel(latents), duration_s)

    def mel_to_latents(self, mel: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """VAE-encode log-mel [B, frames, n_mels] (frames padded to the VAE's factor) to scaled latents."""
        pad = -mel.shape[1] % self.vae_scale_factor
        if pad:
            mel = torch.nn.functional.pad(mel, (0, 0, 0, pad), value=math.log(1e-5))
        posterior = self.vae.encode(mel.unsqueeze(1).to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.vae.config.scaling_factor

    def waveform_to_mel(self, waveforms: Tensor) -> Tensor:
        """AudioLDM's log-mel of waveforms [B, T] at ``sample_rate`` (16 kHz)."""
        return log_mel(waveforms, AUDIOLDM_MEL)

    def waveform_to_latents(self, waveforms: Tensor) -> Tensor:
        return self.mel_to_latents(self.waveform_to_mel(waveforms).to(self.vae.device))
