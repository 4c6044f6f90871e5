"""Stage 1 of RLScale-LoRA: a concept-slider LoRA learned from contrasting sets (DESIGN.md §6; seed 000).

A training step, for a batch of (positive, negative) log-mel segments and their prompts:
  1. encode both sides with the frozen VAE;
  2. draw one timestep and one noise per pair and noise *both* latents with them (``noised_pair``);
  3. with the LoRA at strength +s predict the noise of the positive latent, at -s that of the
     negative latent (one UNet call, a per-sample strength), s drawn from ``strengths``;
  4. loss = MSE(eps_pos, noise) + MSE(eps_neg, noise) (the published RLScale code trains only the
     positive branch; Concept Sliders' objective uses both).
Every LoRA update passes through the frozen scale layers, g = s * w with w = 1 here (Stage 2 trains w).

Validation generates each prompt from one noise at several strengths with deterministic DDIM,
the slider switched on after ``start_fraction`` of the steps (Sliders' start_noise), and measures
the attribute as the position of the generated latents between the mean negative (-0.5) and the
mean positive (+0.5) training latents (``AttributeProbe``).

Optimisation is automatic: the Trainer's ``accumulate_grad_batches``, ``precision`` and
``gradient_clip_val`` apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import compute_snr
from torch import Tensor, nn

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.conditioning import PromptConditioning
from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.gain_schedule import ClipAttribute, GainSchedule
from rlmusic_pl.lora import LoRAError, lora_parameters, lora_strength, read_adapter_info, set_strength
from rlmusic_pl.modules.base import AudioLDM2Module, check_positive
from rlmusic_pl.rewards.simple import SpectralCentroidReward


@dataclass
class NoisedPair:
    """Both sides of a batch of pairs noised with the same noise at the same timesteps."""

    positive: Tensor  # x_t of the positive latents [B, C, H, W]
    negative: Tensor  # x_t of the negative latents [B, C, H, W]
    noise: Tensor  # the noise added to both [B, C, H, W]
    timesteps: Tensor  # one timestep per pair, shared by both sides [B]


def noised_pair(backbone: AudioLDM2Backbone, positive: Tensor, negative: Tensor, generator: torch.Generator | None = None) -> NoisedPair:
    """Noise positive and negative latents [B, C, H, W] with one noise and one timestep per pair."""
    if positive.shape != negative.shape:
        raise ValueError(f"positive and negative latents differ in shape: {tuple(positive.shape)} and {tuple(negative.shape)}")
    device = generator.device if generator is not None else positive.device
    noise = torch.randn(positive.shape, generator=generator, device=device).to(positive.device)
    steps = backbone.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (positive.shape[0],), generator=generator, device=device).to(positive.device)
    add_noise = backbone.scheduler.add_noise
    return NoisedPair(add_noise(positive, noise, timesteps), add_noise(negative, noise, timesteps), noise, timesteps)


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Mean over the batch of each sample's MSE [B, ...] times its weight [B]."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * weights).mean()


@torch.no_grad()
def generate_at_strengths(
    backbone: AudioLDM2Backbone,
    cond: PromptConditioning,
    noise: Tensor,
    strengths: Sequence[float],
    num_steps: int,
    guidance_scale: float,
    start_fraction: float = 0.0,
) -> Tensor:
    """Deterministic DDIM (eta 0) from the same initial noise at every strength.

    Args:
        cond: conditioning of B prompts.
        noise: x_T of the B prompts [B, C, H, W].
        strengths: slider strengths; all run in one batch.
        start_fraction: the slider is off (strength 0) for this fraction of the first steps, so the
            structure is fixed before the attribute changes.

    Returns:
        final latents [len(strengths) * B, C, H, W], strength-major (strength i, prompt b at i * B + b).
    """
    if not 0.0 <= start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
    batch = noise.shape[0]
    per_sample = torch.tensor([float(s) for s in strengths], device=noise.device).repeat_interleave(batch)
    latents = noise.repeat(len(strengths), *(1,) * (noise.dim() - 1))
    cond = PromptConditioning.cat([cond] * len(strengths))
    start = round(start_fraction * num_steps)
    timesteps = backbone.set_timesteps(num_steps)
    with lora_strength(backbone.unet, 0.0):
        for i, t in enumerate(timesteps):
            set_strength(backbone.unet, per_sample if i >= start else 0.0)
            eps = backbone.predict_noise(latents, t, cond, guidance_scale)
            latents = backbone.scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


def generate_with_schedule(
    backbone: AudioLDM2Backbone,
    cond: PromptConditioning,
    noise: Tensor,
    strengths: Sequence[float],
    num_steps: int,
    guidance_scale: float,
    start_fraction: float = 0.0,
    schedule: GainSchedule | None = None,
    actions: Tensor | None = None,
    attribute_of: Callable[[Tensor], Tensor] | None = None,
    observe: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """``generate_at_strengths`` under a Stage-2 gain schedule attached to the UNet.

    Args:
        schedule: the attached ``GainSchedule`` (None: the plain slider).
        actions: one theta per prompt [B, D] (PPO's rollouts; None: the schedule's mean).
        attribute_of: latents [N, ...] -> attribute [N], for a schedule that depends on the clip
            (``power_position``): every prompt is first generated with the plain slider at the
            schedule's ``pilot_strengths`` and the schedule told each clip's q (``clip_values``) before the other
            strengths are generated; pilots at strengths the schedule ``keeps`` are the outputs there.
        observe: called with the clips' raw values [B * sides] before they are standardised (Stage 2 folds them
            into q's running statistics).

    Returns:
        final latents [len(strengths) * B, ...], strength-major, as ``generate_at_strengths``.
    """
    def generate(at: list[float]) -> Tensor:
        return generate_at_strengths(backbone, cond, noise, at, num_steps, guidance_scale, start_fraction)

    if schedule is None:
        return generate(list(strengths))
    try:
        if not schedule.needs_context:
            schedule.actions = None if actions is None else actions.repeat(len(strengths), 1)
            return generate(list(strengths))
        if attribute_of is None:
            raise LoRAError(f"the gain schedule ({schedule.conditioning}) reads each clip off the plain slider: pass attribute_of")
        pilots = schedule.pilot_strengths(list(strengths))
        schedule.actions, schedule.context = torch.zeros(1, schedule.mean.numel(), device=schedule.mean.device), torch.zeros(1)
        plain = generate(pilots).unflatten(0, (len(pilots), -1))  # theta = 0: the Stage-1 slider
        values = schedule.clip_values(list(strengths), attribute_of(plain.flatten(0, 1)).view(len(pilots), -1))
        if observe is not None and values:
            observe(torch.cat(list(values.values())))
        kept = {s: plain[i] for i, s in enumerate(pilots) if schedule.keeps(s)}
        steered = [s for s in strengths if s not in kept]
        schedule.actions = None if actions is None else actions.repeat(len(steered), 1)
        schedule.set_context(torch.cat([values[math.copysign(1.0, s)] for s in steered]) if steered else None)
        chunks = iter(generate(steered).chunk(len(steered))) if steered else iter(())
        return torch.cat([kept[s] if s in kept else next(chunks) for s in strengths])
    finally:
        schedule.actions = None
        if schedule.needs_context:
            schedule.set_context(None)


def loaded_schedule_attribute(schedule: GainSchedule | None, backbone: AudioLDM2Backbone, duration_s: float,
                              adapter: str | Path) -> Callable[[Tensor], Tensor] | None:
    """For a clip-aware schedule loaded from ``adapter``, what it measures of the plain slider's latents (the
    ``attribute_of`` of ``generate_with_schedule``); None for any other schedule."""
    if schedule is None or not schedule.needs_context:
        return None
    probe = attribute_probe_from(read_adapter_info(Path(adapter))) if schedule.context_attribute == "probe" else None
    if schedule.context_attribute == "probe" and probe is None:
        raise LoRAError(f"{adapter}: its gain schedule measures the attribute probe, which its metadata does not hold")
    return lambda latents: clip_attribute(schedule.context_attribute, backbone, latents, duration_s, probe)


def clip_attribute(kind: ClipAttribute, backbone: AudioLDM2Backbone, latents: Tensor, duration_s: float,
                   probe: AttributeProbe | None = None, waveforms: Tensor | None = None) -> Tensor:
    """Per clip [B], what a Stage-2 schedule measures of final latents [B, ...]: the decoded audio's spectral
    centroid (``centroid``, a fraction of Nyquist; ``waveforms`` if already decoded) or the slider's ``probe``."""
    if kind == "centroid":
        audio = backbone.decode(latents, duration_s).float() if waveforms is None else waveforms
        return SpectralCentroidReward()(audio, backbone.sample_rate, [""] * len(audio), [{}] * len(audio))
    if probe is None or (score := probe.to(latents.device).score(latents)) is None:
        raise LoRAError("the attribute 'probe' needs the slider's attribute probe (in its adapter metadata)")
    return score


class AttributeProbe(nn.Module):
    """Where latents lie on the line from the mean negative to the mean positive training latent.

    Latents are averaged over time first ([C, F] per clip), so clips of any length compare. The
    score is the projection on d = mean_pos - mean_neg, centred and scaled so that the mean
    negative latent scores -0.5 and the mean positive +0.5. The means are running sums over the
    training batches (buffers, kept in checkpoints).

    Args:
        channels: latent channels C.
        frequencies: latent frequency bins F.
    """

    def __init__(self, channels: int, frequencies: int) -> None:
        super().__init__()
        self.register_buffer("positive_sum", torch.zeros(channels, frequencies))
        self.register_buffer("negative_sum", torch.zeros(channels, frequencies))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, positive: Tensor, negative: Tensor) -> None:
        """Add a batch of positive and negative latents [B, C, T, F]."""
        self.positive_sum += positive.float().mean(2).sum(0)
        self.negative_sum += negative.float().mean(2).sum(0)
        self.count += positive.shape[0]

    def means(self, reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
        """(mean positive, mean negative) [C, F], None before any update; ``reduce`` sums over processes."""
        sums = torch.stack([self.positive_sum, self.negative_sum, self.count.expand_as(self.positive_sum)])
        sums = reduce(sums) if reduce is not None else sums
        count = sums[2, 0, 0]
        return None if count == 0 else (sums[0] / count, sums[1] / count)

    def score(self, latents: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """Scores [B] of latents [B, C, T, F]; None before any update."""
        means = self.means(reduce)
        if means is None:
            return None
        positive, negative = means
        direction = positive - negative
        centred = latents.float().mean(2) - (positive + negative) / 2
        return (centred * direction).sum((1, 2)) / direction.pow(2).sum().clamp(min=1e-12)


def attribute_probe_from(adapter_info: dict) -> AttributeProbe | None:
    """The Stage-1 attribute probe saved in a slider's metadata (its two mean latents); None if absent."""
    means = adapter_info.get("attribute_probe")
    if means is None:
        return None
    positive, negative = torch.tensor(means["positive_mean"]), torch.tensor(means["negative_mean"])
    probe = AttributeProbe(*positive.shape)
    probe.positive_sum.copy_(positive)
    probe.negative_sum.copy_(negative)
    probe.count.fill_(1)
    return probe


class SliderModule(AudioLDM2Module):
    """Stage-1 concept-slider LoRA: +s makes the attribute's positive side, -s its negative side.

    Train with ``PromptAttributeDataModule(contrast=ContrastSets(...))``: every training item holds
    a prompt and a (positive, negative) log-mel pair. The trained slider is exported in diffusers'
    LoRA format plus the scale layers to ``<run dir>/adapter`` and ``export_to``, its metadata
    holding the attribute labels and the probe's mean latents.

    Args:
        strengths: slider strengths s drawn (uniformly, one per batch) for training; the positive
            side is trained at +s, the negative at -s. Must be positive. More than one value keeps
            the effect proportional to the strength (on the tiny backbone, [1.0] alone gave a
            response that flattened above 0 for some prompts).
        learning_rate: AdamW learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        snr_gamma: Min-SNR-gamma weighting of the noise MSE per timestep (weight min(SNR, gamma) / SNR,
            as diffusers' training scripts' ``--snr_gamma``): low-noise steps, which only refine detail,
            weigh less, so more of the gradient goes to the noisy steps where a global attribute such as
            brightness is decided. None (default) weighs every timestep alike.
        val_strengths: strengths generated at in validation and testing (from one noise per prompt).
        val_num_steps: DDIM steps of validation generation.
        val_guidance_scale: classifier-free guidance scale of validation generation.
        start_fraction: fraction of the validation steps run before the slider is switched on.
        duration_s: seconds of audio generated in validation and testing.
        seed: seed of the training draws (noise, timesteps, strengths; per process, not replayed on
            resume) and of the validation noise (fixed per batch, so epochs compare).
        **backbone_args: see ``AudioLDM2Module`` (backbone, LoRA rank/alpha, ``lora_targets`` default
            ``self_attention``: cross-attention to text is left alone, ``self_attention+conv`` also
            adapts the ResNet convolutions).
    """

    trainable_state_prefixes = ("attribute_probe.",)

    def __init__(
        self,
        strengths: list[float] = [0.5, 1.0],  # noqa: B006 (jsonargparse needs a list default)
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        snr_gamma: float | None = None,
        val_strengths: list[float] = [-1.0, -0.5, 0.0, 0.5, 1.0],  # noqa: B006
        val_num_steps: int = 50,
        val_guidance_scale: float = 3.5,
        start_fraction: float = 0.0,
        duration_s: float = 10.0,
        seed: int = 0,
        **backbone_args,
    ) -> None:
        backbone_args.setdefault("lora_targets", "self_attention")
        super().__init__(**backbone_args)
        if not strengths or any(s <= 0 for s in strengths):
            raise ValueError(f"strengths must be a non-empty list of positive numbers (the sign comes from the side), got {strengths}")
        if not val_strengths:
            raise ValueError("val_strengths must not be empty")
        if not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
        check_positive(val_num_steps=val_num_steps, duration_s=duration_s)
        if snr_gamma is not None:
            check_positive(snr_gamma=snr_gamma)
        self.attribute_probe: AttributeProbe | None = None
        self.contrast_labels: dict[str, str] = {}
        self._generator: torch.Generator | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.attribute_probe is None:
            channels, _, frequencies = self.backbone.latent_shape(1.0)
            self.attribute_probe = AttributeProbe(channels, frequencies).to(self.device)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(lora_parameters(self.backbone.unet), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    # --------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        self._generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 7_919 * self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        missing = {"positive_mel", "negative_mel"} - batch.keys()
        if missing:
            raise KeyError(f"SliderModule needs contrast pairs in its training batches (missing {sorted(missing)}): "
                           "give the data module contrast=ContrastSets(...) or SyntheticContrastSets(...)")
        generator = self._generator or torch.Generator(device=self.device).manual_seed(self.hparams.seed)
        positive, negative = self.encode_pair(batch["positive_mel"], batch["negative_mel"])
        self.attribute_probe.update(positive, negative)
        self.contrast_labels = batch.get("contrast", [{}])[0]
        pair = noised_pair(self.backbone, positive, negative, generator)
        strength = self.draw_strength(generator)
        cond = self.backbone.encode_prompts(batch["prompt"], batch["negative_prompt"])
        loss_positive, loss_negative = self.slider_losses(pair, cond, strength)
        loss = loss_positive + loss_negative
        batch_size = positive.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_positive", loss_positive, batch_size=batch_size)
        self.log("train/loss_negative", loss_negative, batch_size=batch_size)
        self.log("train/strength", strength, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The backward pass is done: per-sample strengths of the training batch no longer apply.
        set_strength(self.backbone.unet, 1.0)

    @torch.no_grad()
    def encode_pair(self, positive_mel: Tensor, negative_mel: Tensor) -> tuple[Tensor, Tensor]:
        """VAE latents (posterior mode) of both sides, in one VAE call."""
        latents = self.backbone.mel_to_latents(torch.cat([positive_mel, negative_mel]).to(self.device)).float()
        return latents.chunk(2)

    def draw_strength(self, generator: torch.Generator) -> float:
        strengths = self.hparams.strengths
        return float(strengths[int(torch.randint(len(strengths), (1,), generator=generator, device=generator.device))])

    def slider_losses(self, pair: NoisedPair, cond: PromptConditioning, strength: float) -> tuple[Tensor, Tensor]:
        """MSE of the noise predicted at +strength for the positive side and at -strength for the negative side.

        Both sides run as one UNet batch without guidance (only the prompt's conditioning), each
        half at its own strength.
        """
        batch = pair.noise.shape[0]
        strengths = torch.tensor([strength, -strength], device=pair.noise.device).repeat_interleave(batch)
        # Left set until on_train_batch_end: gradient checkpointing re-runs the forward in the backward pass.
        set_strength(self.backbone.unet, strengths)
        latents = torch.cat([pair.positive, pair.negative])
        eps = self.backbone.predict_noise(latents, torch.cat([pair.timesteps, pair.timesteps]), PromptConditioning.cat([cond, cond]), 1.0)
        eps_positive, eps_negative = eps.float().chunk(2)
        weights = self.timestep_weights(pair.timesteps)
        return weighted_mse(eps_positive, pair.noise, weights), weighted_mse(eps_negative, pair.noise, weights)

    def timestep_weights(self, timesteps: Tensor) -> Tensor:
        """Per-sample loss weights [B]: Min-SNR-gamma's min(SNR, gamma) / SNR, or ones."""
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = compute_snr(self.backbone.scheduler, timesteps).to(timesteps.device)
        return snr.clamp(max=gamma) / snr

    # --------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int) -> dict:
        hp = self.hparams
        prompts, strengths = batch["prompt"], [float(s) for s in hp.val_strengths]
        cond = self.backbone.encode_prompts(prompts, batch["negative_prompt"])
        generator = torch.Generator(device=self.device).manual_seed(hp.seed + 7_919 * batch_idx + self.global_rank)
        noise = self.backbone.initial_latents(len(prompts), hp.duration_s, generator)
        latents = generate_at_strengths(self.backbone, cond, noise, strengths, hp.val_num_steps, hp.val_guidance_scale, hp.start_fraction)
        waveforms = self.backbone.decode(latents, hp.duration_s)
        scores = self.attribute_probe.score(latents, self._sum_over_processes())
        if scores is not None:
            self._log_attribute(stage, scores.view(len(strengths), len(prompts)), strengths)
        return {"samples": SampleBatch(
            waveforms=waveforms.detach().float().cpu(),
            sample_rate=self.backbone.sample_rate,
            prompts=list(prompts) * len(strengths),
            attributes=list(batch["attributes"]) * len(strengths),
            rewards={} if scores is None else {"attribute": scores.detach().cpu()},
            strengths=torch.tensor(strengths).repeat_interleave(len(prompts)),
        )}

    def _log_attribute(self, stage: str, scores: Tensor, strengths: list[float]) -> None:
        """Mean attribute per strength, its least-squares slope over strength, and the fraction of prompts it rises monotonically for."""
        count = scores.shape[1]
        for strength, row in zip(strengths, scores):
            self.log(f"{stage}/attribute/strength={strength:+.2f}", row.mean(), batch_size=count, sync_dist=True)
        order = torch.tensor(strengths, device=scores.device).argsort()
        s = torch.tensor(strengths, device=scores.device)[order, None]
        ordered = scores[order]
        slope = ((s - s.mean()) * (ordered - ordered.mean(0))).sum(0) / (s - s.mean()).pow(2).sum().clamp(min=1e-12)
        monotonic = (ordered.diff(dim=0) > 0).all(0).float()
        self.log(f"{stage}/attribute_slope", slope.mean(), batch_size=count, sync_dist=True, prog_bar=True)
        self.log(f"{stage}/attribute_monotonic", monotonic.mean(), batch_size=count, sync_dist=True)

    def _sum_over_processes(self) -> Callable[[Tensor], Tensor] | None:
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        return lambda tensor: self.all_gather(tensor).sum(0)

    # --------------------------------------------------------------------------- export
    def adapter_metadata(self) -> dict:
        metadata = {**super().adapter_metadata(), "strengths": list(self.hparams.strengths), "contrast": self.contrast_labels}
        means = self.attribute_probe.means(self._sum_over_processes()) if self.attribute_probe is not None else None
        if means is not None:
            metadata["attribute_probe"] = {"positive_mean": means[0].tolist(), "negative_mean": means[1].tolist()}
        return metadata
