"""Sweeps of MusicGen (``predict``): prompts x seeds x strengths of a trained decoder LoRA, to WAVs, a table and plots.

``MusicGenSweepPredictor`` is what every MusicGen sweep shares (this adapter-strength sweep and
``SteeringModule``'s coefficient sweep): all the strengths of a (prompt, seed) are sampled in one
batch, sample i at strength i, with one random generator per sample seeded by the seed alone, so
every strength sees the same random draws and only the swept control differs between the columns.
``SweepWriter`` (rlmusic_pl.callbacks) writes the WAVs, the table, the plots and the listening page.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from rlmusic_pl.callbacks.sweep_clips import Clip
from rlmusic_pl.lora import load_lora, lora_strength
from rlmusic_pl.modules.backbone_module import check_positive
from rlmusic_pl.modules.musicgen import MusicGenModule
from rlmusic_pl.modules.sweep import (
    SweepError,
    SweepPredictor,
    adapter_digest,
    check_seeds,
    check_strengths,
    resolve_adapter,
    warn_if_trained_on_another_backbone,
)
from rlmusic_pl.rewards.base import Reward, as_rewards

log = logging.getLogger(__name__)

TRAIN_FIRST = "python -m rlmusic_pl fit --config configs/tiny/musicrl_clap.yaml"


class MusicGenSweepPredictor(SweepPredictor):
    """``SweepPredictor`` on MusicGen: the strengths of a (prompt, seed) in one sampling batch from the same draws.

    The module provides ``sweep_control(strengths, seed)``, a context under which sample i of the
    batch is generated at ``strengths[i]`` (a tensor [N]), and the hyperparameters ``duration_s``,
    ``guidance_scale``, ``temperature`` and ``top_k``, besides what ``SweepPredictor`` needs.
    """

    def sweep_control(self, strengths: Tensor, seed: int):
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, clips: list[Clip], strengths: list[float]) -> Tensor:
        """Waveforms [len(clips) x len(strengths), T] (cpu): each clip's prompt and seed at each strength."""
        hp = self.hparams
        pairs = [(clip, strength) for clip in clips for strength in strengths]
        cond = self.backbone.encode_prompts([clip.prompt for clip, _ in pairs])
        values = torch.tensor([strength for _, strength in pairs], dtype=torch.float32)
        # One generator per sample, seeded by its seed only: every strength sees the same random draws.
        generators = [torch.Generator(device=self.device).manual_seed(clip.seed) for clip, _ in pairs]
        with self.sweep_control(values, clips[0].seed):
            codes = self.backbone.sample(cond, self.backbone.num_frames(hp.duration_s), guidance_scale=hp.guidance_scale,
                                         temperature=hp.temperature, top_k=hp.top_k or None, generator=generators).codes
        return self.backbone.decode(codes).cpu()

    def expected_samples(self) -> int:
        frames = self.backbone.num_frames(self.hparams.duration_s)
        return frames * self.backbone.sample_rate // self.backbone.frame_rate


class MusicGenSweepModule(MusicGenSweepPredictor, MusicGenModule):
    """Strength sweeps of a trained MusicGen decoder LoRA (a MusicRL adapter, or any peft LoRA of the decoder).

    ``predict``: for each prompt x seed x strength one clip; strength 0 is the base model (its codes
    are exactly the base model's for that seed), 1 the trained adapter, and other values scale its
    update (negative: away from it). With ``SweepWriter`` among the trainer's callbacks it writes one
    16-bit WAV per clip, a table of metrics (CSV and JSON), a plot of each metric against strength, a
    mel grid and a listening page; a re-run only generates the missing clips.

    Args:
        adapter: directory of a trained decoder LoRA (``<run dir>/adapter``, or its ``export_to`` copy).
        strengths: adapter strengths to sweep (0 = the base model, 1 = the trained adapter).
        seeds: sampling seeds; each (prompt, seed) uses the same random draws at every strength.
        output_dir: where clips, table and plots go (default: ``<trainer default_root_dir>/sweep``).
        metrics: rewards whose components are the table's metrics (e.g. the reward the adapter was
            trained on); the SSIM of each clip's mel to its strength-0 clip is added when 0 is swept.
        duration_s: seconds of audio per clip.
        guidance_scale: classifier-free guidance scale (use the one the adapter was trained with).
        temperature: sampling temperature.
        top_k: sampling top-k (0: none).
        sample_batch_size: most clips per sampling batch.
        **backbone_args: see ``MusicGenModule`` (backbone, frozen dtype, text length); the LoRA rank,
            alpha and targets are read from the adapter, not from these.
    """

    hparams_ignore = ("metrics",)

    def __init__(
        self,
        adapter: str,
        strengths: list[float] = (0.0, 0.5, 1.0),
        seeds: list[int] = (0, 1, 2),
        output_dir: str | None = None,
        metrics: list[Reward] | None = None,
        duration_s: float = 10.0,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 250,
        sample_batch_size: int = 8,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        check_positive(SweepError, duration_s=duration_s, sample_batch_size=sample_batch_size, temperature=temperature)
        self.strengths = check_strengths(strengths)
        self.seeds = check_seeds(seeds)
        self.adapter_path = resolve_adapter(adapter, self.adapter_layout, TRAIN_FIRST, "configs/tiny/musicgen_sweep.yaml")
        self.adapter_kind = warn_if_trained_on_another_backbone(self.adapter_path, self.hparams.backbone).get("kind", "LoRA")
        self.metrics = nn.ModuleList(as_rewards(metrics, "MusicGenSweepModule metrics"))

    def add_adapters(self, network: nn.Module) -> None:
        load_lora(network, self.adapter_path)
        log.info("sweeping a %s adapter from %s", self.adapter_kind, self.adapter_path)

    def configure_optimizers(self):
        return None  # predict only

    def sweep_control(self, strengths: Tensor, seed: int):
        """Sample i at adapter strength ``strengths[i]`` (the guided batch's unconditional half included)."""
        return lora_strength(self.backbone.decoder, strengths)

    def generation_settings(self) -> dict:
        """Everything that decides a clip's audio besides its prompt, strength and seed."""
        hp = self.hparams
        names = ("backbone", "backbone_seed", "frozen_dtype", "text_length", "duration_s", "guidance_scale", "temperature", "top_k")
        return {"adapter_sha256": adapter_digest(self.adapter_path), **{name: hp[name] for name in names}}
