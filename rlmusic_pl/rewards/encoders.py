"""Frozen audio and text encoders for learned rewards: each turns (clip, prompt) into two fixed vectors.

A preference reward model (``rlmusic_pl.modules.preference``) trains a small head on top of one of
these; the encoder itself never trains, so its embeddings of a clip can be cached. Every encoder
records how it was built (``spec``), so an exported reward model can rebuild it (``build_encoder``).

- ``CLAPEncoder``: CLAP's audio and text embeddings (``laion/larger_clap_music`` by default), the
  same model and preprocessing as ``CLAPReward`` (48 kHz audio, per-row embeddings).
- ``MelStatisticsEncoder``: no weights at all, the mean and standard deviation of each log-mel band
  over time and a hashed bag of the prompt's character trigrams. Cheap, deterministic, and it
  carries timbre and level, so tiny runs and demos learn something without a trained CLAP.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

import torch
from torch import Tensor, nn

from rlmusic_pl.data.audio import AUDIOLDM_MEL, log_mel, resample
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.rewards.clap import CLAPReward


class EncoderError(RLMusicError, ValueError):
    """An encoder cannot be built from its description; the message names the class path or argument."""


class AudioTextEncoder(nn.Module):
    """Base class of frozen encoders: ``embed_audio(waveforms [B, T], sample_rate) -> [B, audio_dim]`` and
    ``embed_text(prompts) -> [B, text_dim]``. Both are deterministic, so embeddings may be cached.

    Subclasses call ``super().__init__(**their_init_args)`` so that ``spec`` can rebuild them.
    """

    audio_dim: int
    text_dim: int

    def __init__(self, **init_args: Any) -> None:
        super().__init__()
        self.init_args = init_args

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: what ``build_encoder`` rebuilds this encoder from."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self.init_args)}

    def train(self, mode: bool = True) -> AudioTextEncoder:
        return super().train(False)  # frozen: never dropout, so embeddings stay cacheable

    def embed_audio(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        raise NotImplementedError

    def embed_text(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError


class CLAPEncoder(AudioTextEncoder):
    """CLAP audio and text embeddings (the projection outputs, not normalised), frozen.

    Args:
        model: hub id or local directory of a transformers CLAP, or ``"tiny"`` (random weights, tests).
        checkpoint: optional laion-clap ``.pt`` whose weights replace ``model``'s (see ``CLAPReward``).
        seed: weight seed of the ``"tiny"`` model.
    """

    def __init__(self, model: str = "laion/larger_clap_music", checkpoint: str | None = None, seed: int = 0) -> None:
        super().__init__(model=model, checkpoint=checkpoint, seed=seed)
        self.clap = CLAPReward(model=model, checkpoint=checkpoint, seed=seed)  # the CLAP reward's loading and preprocessing
        self.audio_dim = self.text_dim = self.clap.model.config.projection_dim

    @torch.no_grad()
    def embed_audio(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        return self.clap.embed_audio(waveforms, sample_rate).float()

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Tensor:
        return self.clap.embed_text(prompts).float()


class MelStatisticsEncoder(AudioTextEncoder):
    """Per-band mean and standard deviation over time of AudioLDM's log-mel (16 kHz, 64 bands), and a
    hashed bag of character trigrams of the prompt (L2-normalised counts in ``text_dim`` buckets).

    Args:
        text_dim: buckets of the prompt's trigram hash.
    """

    def __init__(self, text_dim: int = 64) -> None:
        super().__init__(text_dim=text_dim)
        if text_dim < 1:
            raise EncoderError(f"MelStatisticsEncoder: text_dim must be at least 1, got {text_dim}")
        self.text_dim = text_dim
        self.audio_dim = 2 * AUDIOLDM_MEL.n_mels

    @torch.no_grad()
    def embed_audio(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        mel = log_mel(resample(waveforms.float(), sample_rate, AUDIOLDM_MEL.sample_rate))  # [B, frames, mels]
        return torch.cat([mel.mean(dim=1), mel.std(dim=1, correction=0)], dim=-1)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Tensor:
        counts = torch.zeros(len(prompts), self.text_dim)
        for row, prompt in enumerate(prompts):
            text = f"  {prompt.lower()} "
            for start in range(len(text) - 2):
                # A stable hash (Python's own is salted per process), so embeddings repeat across runs.
                bucket = int.from_bytes(hashlib.blake2b(text[start : start + 3].encode(), digest_size=4).digest(), "little")
                counts[row, bucket % self.text_dim] += 1.0
        return torch.nn.functional.normalize(counts, dim=-1)


def build_encoder(spec: dict[str, Any]) -> AudioTextEncoder:
    """The encoder described by ``spec`` (``AudioTextEncoder.spec()``): its class path and init arguments."""
    class_path = spec.get("class_path", "") if isinstance(spec, dict) else ""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise EncoderError(f"encoder class_path {class_path!r} does not import ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, AudioTextEncoder)):
        raise EncoderError(f"encoder class_path {class_path!r} is not an AudioTextEncoder")
    try:
        return cls(**spec.get("init_args", {}))
    except TypeError as err:
        raise EncoderError(f"encoder {class_path}: cannot be built with {spec.get('init_args')} ({err})") from None
