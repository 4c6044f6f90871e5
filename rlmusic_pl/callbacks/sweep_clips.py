"""The clips of an attribute-strength sweep, as ``SweepModule.predict_step`` returns them for ``SweepWriter``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Clip:
    """One clip of a sweep: a prompt of the batch (``item``) at one seed and strength, and its metrics."""

    item: int
    prompt: str
    negative_prompt: str
    attributes: dict[str, str]
    seed: int
    strength: float
    metrics: dict[str, float] | None = None

    @property
    def file_name(self) -> str:
        return clip_file_name(self.prompt, self.negative_prompt, self.strength, self.seed)


@dataclass
class SweepClips:
    """What ``SweepModule.predict_step`` returns: every clip of the batch, and the audio of those generated now."""

    clips: list[Clip]
    new_audio: dict[str, Tensor]  # file name -> waveform [T] (cpu), as it will be stored
    sample_rate: int


def clip_file_name(prompt: str, negative_prompt: str, strength: float, seed: int) -> str:
    """``<prompt slug>_<hash>_strength<+s>_seed<n>.wav``; the hash keeps long or similar prompts apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
    digest = hashlib.sha1(f"{prompt}\0{negative_prompt}".encode()).hexdigest()[:8]
    return f"{slug}_{digest}_strength{strength:+g}_seed{seed}.wav"
