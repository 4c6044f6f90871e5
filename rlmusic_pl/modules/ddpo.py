"""DDPO: reinforcement learning of an AudioLDM2 LoRA from a reward (Black et al. 2023; seed 001).

Each training step is one DDPO epoch over a batch of prompts:
  1. sample trajectories with a stochastic DDIM loop, recording x_t, x_{t-1}, log-probs, timesteps and
     each sample's own conditioning (negative and positive, in sampling order);
  2. score the decoded audio with the reward (and any monitor rewards, logged but not optimised);
  3. turn rewards into advantages (per-prompt running statistics, per-group, or whole batch), with
     prompts and rewards gathered from every rank so all ranks compute identical statistics;
  4. ``inner_epochs`` passes of the clipped importance-ratio loss over a random ``timestep_fraction``
     of each trajectory's steps, recomputing the guided noise prediction exactly as when sampling,
     plus ``kl_coef`` times the closed-form KL of each trained step to the reference model's (DPOK).

Optimisation is manual (the loss is accumulated over timesteps), so gradient accumulation and
clipping are this module's arguments, not the Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlmusic_pl.backbone.conditioning import PromptConditioning
from rlmusic_pl.backbone.ddim import gaussian_kl, gaussian_log_prob
from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError, check_positive
from rlmusic_pl.modules.ppo import clipped_surrogate
from rlmusic_pl.modules.reward_rl import RewardRL
from rlmusic_pl.rewards.base import Reward, RewardResult


@dataclass
class Rollouts:
    """Trajectories of one DDPO epoch on this rank (B samples, S steps)."""

    latents: Tensor  # [B, S + 1, C, H, W]
    log_probs: Tensor  # [B, S]
    timesteps: Tensor  # [S]
    cond: PromptConditioning
    prompts: list[str]
    attributes: list[dict[str, str]]
    waveforms: Tensor  # [B, T]
    rewards: RewardResult
    advantages: Tensor | None = None  # [B]


@dataclass
class StepTerms:
    """The loss of one trained denoising step and what is logged of it."""

    loss: Tensor  # clipped surrogate + kl_coef * kl_to_reference
    approx_kl: Tensor  # 0.5 mean (log ratio)^2, against the sampling policy
    clipfrac: Tensor
    kl_to_reference: Tensor | None  # mean over the samples of the closed-form KL to the reference step; None: not computed


class DDPOModule(RewardRL, AudioLDM2Module):
    """DDPO fine-tuning of a LoRA on the AudioLDM2 UNet.

    Args:
        reward: the reward to maximise (e.g. ``CLAPReward``, ``EmotionReward``, ``WeightedReward``; from
            Python also a plain function ``(waveforms, sample_rate, prompts, attributes) -> [B]``, wrapped
            in ``CallableReward``).
        monitor_rewards: rewards computed and logged on every epoch's samples but not optimised, to
            watch for reward hacking (e.g. emotion accuracy while optimising CLAP).
        duration_s: seconds of audio per sample.
        num_steps: DDIM steps per sample.
        guidance_scale: classifier-free guidance scale, used identically when sampling and training.
        eta: DDIM stochasticity (> 0).
        samples_per_prompt: samples of each prompt per epoch, from different initial noise.
        sample_batch_size: samples generated per UNet batch.
        train_batch_size: samples per training minibatch.
        inner_epochs: optimisation passes over each epoch's samples.
        timestep_fraction: fraction of each trajectory's steps trained on (chosen at random).
        clip_range: PPO ratio clip epsilon.
        adv_clip_max: advantages are clipped to +-this value.
        advantage: ``per_prompt`` (running statistics per prompt), ``group`` (each prompt's
            ``samples_per_prompt`` samples normalised by their own mean/std, GRPO-style) or ``batch``.
        stat_buffer_size: rewards kept per prompt for ``per_prompt`` statistics.
        stat_min_count: rewards a prompt needs before its own statistics replace the batch's.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        gradient_accumulation: training minibatches (each over all its trained timesteps) per
            optimizer step. Replaces the Trainer's ``accumulate_grad_batches``.
        max_grad_norm: gradient norm clipping of the LoRA weights (0 disables). Replaces the Trainer's
            ``gradient_clip_val``.
        kl_coef: weight of the KL to the reference model (the backbone with the LoRA switched off) in the
            loss, as in DPOK. Per trained step both models' steps are Gaussians with the same sigma_t from
            the same x_t, so the KL is closed-form: ``sum ||mu_theta - mu_ref||^2 / (2 sigma_t^2)``,
            summed over the latent elements (so it grows with the clip's length) and averaged over the
            minibatch's samples and the trained steps, like the surrogate; a whole trajectory's KL is
            about ``num_steps`` times it. ``train/kl_to_reference`` is logged even at 0. Cost: one
            extra gradient-free (guided) UNet pass per trained step when ``kl_coef > 0``; at 0 only
            per minibatch (on its first trained step, a random one, so the logged mean is an unbiased,
            noisier estimate of the same quantity).
        seed: seed of sampling noise and of the training shuffles (with the step and rank).
        **backbone_args: see ``AudioLDM2Module`` (backbone, LoRA rank/alpha/targets, ...).
    """

    hparams_ignore = ("reward", "monitor_rewards")

    def __init__(
        self,
        reward: Reward,
        monitor_rewards: list[Reward] | None = None,
        duration_s: float = 10.0,
        num_steps: int = 19,
        guidance_scale: float = 3.5,
        eta: float = 1.0,
        samples_per_prompt: int = 1,
        sample_batch_size: int = 1,
        train_batch_size: int = 1,
        inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantage: Literal["per_prompt", "group", "batch"] = "per_prompt",
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        gradient_accumulation: int = 1,
        max_grad_norm: float = 1.0,
        kl_coef: float = 0.0,
        seed: int = 0,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        check_positive(num_steps=num_steps, samples_per_prompt=samples_per_prompt, sample_batch_size=sample_batch_size,
                        train_batch_size=train_batch_size, inner_epochs=inner_epochs, gradient_accumulation=gradient_accumulation,
                        duration_s=duration_s, eta=eta, clip_range=clip_range)
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if advantage == "group" and samples_per_prompt < 2:
            raise ValueError("advantage='group' needs samples_per_prompt >= 2")
        self.automatic_optimization = False
        self.init_rewards(reward, monitor_rewards, "DDPOModule", stat_buffer_size, stat_min_count)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(lora_parameters(self.backbone.unet), lr=hp.learning_rate, betas=tuple(hp.adam_betas),
                                 eps=hp.adam_eps, weight_decay=hp.weight_decay)

    # --------------------------------------------------------------------------- the DDPO epoch
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        rollouts = self.sample_rollouts(batch, self.seeded_generator("sample"))
        rollouts.advantages = self.compute_advantages(rollouts)
        metrics = self.train_on_rollouts(rollouts)
        self.epochs_sampled += 1
        self.log_rewards("train", rollouts.rewards)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return {"samples": self._sample_batch(rollouts)}

    def sample_rollouts(self, batch: dict, generator: torch.Generator) -> Rollouts:
        """Generate ``samples_per_prompt`` trajectories per prompt and score them."""
        hp = self.hparams
        k = hp.samples_per_prompt
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        negatives = [n for n in batch["negative_prompt"] for _ in range(k)]
        attributes = [a for a in batch["attributes"] for _ in range(k)]
        chunks = []
        for start in range(0, len(prompts), hp.sample_batch_size):
            part = slice(start, start + hp.sample_batch_size)
            cond = self.backbone.encode_prompts(prompts[part], negatives[part])
            noise = self.backbone.initial_latents(len(cond), hp.duration_s, generator)
            result = self.backbone.sample(cond, noise, hp.num_steps, hp.guidance_scale, hp.eta, generator)
            waveforms = self.backbone.decode(result.final, hp.duration_s)
            chunks.append((result, cond, waveforms))
        waveforms = torch.cat([c[2] for c in chunks])
        return Rollouts(
            latents=torch.cat([c[0].latents for c in chunks]),
            log_probs=torch.cat([c[0].log_probs for c in chunks]),
            timesteps=chunks[0][0].timesteps,
            cond=PromptConditioning.cat([c[1] for c in chunks]),
            prompts=prompts,
            attributes=attributes,
            waveforms=waveforms,
            rewards=self.score(waveforms, prompts, attributes),
        )

    def compute_advantages(self, rollouts: Rollouts) -> Tensor:
        """Advantages of this rank's samples, from statistics over every rank's prompts and rewards."""
        hp = self.hparams
        advantages = self.advantages_from_rewards(rollouts.prompts, rollouts.rewards.total, hp.advantage, hp.samples_per_prompt)
        return advantages.clamp(-hp.adv_clip_max, hp.adv_clip_max)

    def train_on_rollouts(self, rollouts: Rollouts) -> dict[str, Tensor]:
        """``inner_epochs`` passes of the clipped surrogate over shuffled samples and timesteps."""
        hp = self.hparams
        optimizer = self.optimizers()
        generator = self.seeded_generator("train")
        batch, steps = rollouts.log_probs.shape
        trained_steps = max(1, int(steps * hp.timestep_fraction))
        scale = 1.0 / (hp.gradient_accumulation * trained_steps)
        self.backbone.set_timesteps(hp.num_steps)
        history: dict[str, list[Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl_to_reference": []}
        minibatches = 0
        for _ in range(hp.inner_epochs):
            order = torch.randperm(batch, generator=generator).to(self.device)
            step_order = torch.stack([torch.randperm(steps, generator=generator) for _ in range(batch)]).to(self.device)
            for start in range(0, batch, hp.train_batch_size):
                rows = order[start : start + hp.train_batch_size]
                with self.no_gradient_sync():
                    for j in range(trained_steps):
                        terms = self.step_loss(rollouts, rows, step_order[rows, j], with_kl=hp.kl_coef > 0 or j == 0)
                        self.manual_backward(terms.loss * scale)
                        for name in history:
                            value = getattr(terms, name)
                            if value is not None:
                                history[name].append(value.detach())
                minibatches += 1
                if minibatches % hp.gradient_accumulation == 0:
                    optimizer.step()
                    optimizer.zero_grad()
        if minibatches % hp.gradient_accumulation:
            optimizer.step()
            optimizer.zero_grad()
        return {name: torch.stack(values).mean() for name, values in history.items()}

    def step_loss(self, rollouts: Rollouts, rows: Tensor, step_index: Tensor, with_kl: bool | None = None) -> StepTerms:
        """The loss of one denoising step for the samples ``rows`` (each its own step): the clipped
        surrogate, plus ``kl_coef`` times the KL to the reference, which is computed when ``with_kl``
        (default: when ``kl_coef > 0``)."""
        hp = self.hparams
        distribution = self.step_distribution(rollouts, rows, step_index)
        log_prob = self.step_log_prob(rollouts, rows, step_index, distribution)
        terms = clipped_surrogate(log_prob, rollouts.log_probs[rows, step_index], rollouts.advantages[rows], hp.clip_range)
        if with_kl is None:
            with_kl = hp.kl_coef > 0
        kl = self.kl_to_reference(rollouts, rows, step_index, *distribution).mean() if with_kl else None
        loss = terms.loss + hp.kl_coef * kl if hp.kl_coef > 0 else terms.loss
        return StepTerms(loss=loss, approx_kl=terms.approx_kl, clipfrac=terms.clipfrac, kl_to_reference=kl)

    def step_distribution(self, rollouts: Rollouts, rows: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of each sample's step ``step_index`` under the current network (see ``ddim_step_distribution``).

        The guided noise prediction is recomputed with each sample's own stored conditioning, negative
        and positive in sampling order, exactly as when sampling.
        """
        hp = self.hparams
        latents = rollouts.latents[rows, step_index]
        eps = self.backbone.predict_noise(latents, rollouts.timesteps[step_index], rollouts.cond[rows.cpu()], hp.guidance_scale)
        return self.backbone.ddim_distribution(eps, rollouts.timesteps[step_index], latents, hp.eta)

    def step_log_prob(self, rollouts: Rollouts, rows: Tensor, step_index: Tensor,
                      distribution: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Log-prob [len(rows)] of each sample's recorded step ``step_index`` under the current policy
        (whose ``step_distribution`` may be given). Before any update it equals the log-prob recorded while sampling."""
        mean, std = distribution if distribution is not None else self.step_distribution(rollouts, rows, step_index)
        return gaussian_log_prob(rollouts.latents[rows, step_index + 1], mean, std)

    def kl_to_reference(self, rollouts: Rollouts, rows: Tensor, step_index: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """KL [len(rows)] from the policy's step N(mean, std^2) to the reference's: the same x_t, conditioning
        and sigma_t with the LoRA switched off (no gradient), ``sum ||mean - mean_ref||^2 / (2 std^2)`` over latent elements."""
        with torch.no_grad(), lora_strength(self.backbone.unet, 0.0):
            reference_mean, _ = self.step_distribution(rollouts, rows, step_index)
        return gaussian_kl(mean, reference_mean, std)

    # --------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int) -> dict:
        rollouts = self.sample_rollouts(batch, self.evaluation_generator(batch_idx))
        self.log_rewards(stage, rollouts.rewards)
        return {"samples": self._sample_batch(rollouts)}

    # --------------------------------------------------------------------------- helpers
    def _sample_batch(self, rollouts: Rollouts) -> SampleBatch:
        return self.sample_batch(rollouts.waveforms, rollouts.prompts, rollouts.attributes, rollouts.rewards)

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ddpo"] = {"stat_tracker": self.stat_tracker.state_dict(), "epochs_sampled": self.epochs_sampled}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ddpo")
        if state is None:
            raise CheckpointError("the checkpoint has no DDPO state (per-prompt statistics, counters): not saved by DDPOModule")
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.epochs_sampled = state["epochs_sampled"]

