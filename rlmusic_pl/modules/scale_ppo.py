"""Stage 2 of RLScale-LoRA: PPO on the slider's scale layers for smooth strength control (DESIGN.md §7; seed 000).

The Stage-1 slider (base model and LoRA A/B weights) is loaded and frozen. What is trained is the
``GainSchedule`` of its scale layers (``rlmusic_pl.gain_schedule``): per LoRA layer (optionally per
channel), a multiplier ``1 + theta . phi(s, t)`` of the Stage-1 gain. ``theta`` starts at 0, so
Stage 2 starts exactly where Stage 1 ended; the policy is a Gaussian over ``theta``.

PPO as a contextual bandit, one training step per batch of prompts:
  1. context: each prompt with one initial noise; action: a draw of ``theta`` from the Gaussian
     policy ``N(mean, std^2)``, ``rollouts_per_prompt`` per prompt in mirrored pairs (mean +- std * z);
  2. every rollout generates its prompt at every strength of the grid (deterministic DDIM, all in
     one UNet batch, each sample with its own theta; a clip-aware schedule first generates each clip
     with the plain slider at its pilot strengths (``power_position``: 0, 1/2 and 1), folds every
     rank's values read off them into q's running mean and std, and tells the schedule each clip's q);
  3. the sweep rewards score each rollout's whole grid: the spectral-temporal stability of the
     intermediate strengths and the even rise of the Stage-1 attribute (``rewards.stability``);
  4. ``ppo_epochs`` full-batch steps of: the clipped surrogate on the actions' log-probs with
     advantages (reward - value baseline) / reward std, a value loss, an entropy bonus and a
     penalty keeping theta (the gains) near its start. With ``context_advantages`` the baseline of a
     rollout is instead the mean reward of the rollouts that share its prompt and noise.

The UNet is never differentiated: the generation runs without gradients and the loss only involves
the policy's Gaussian, so a step costs one batched generation (two with a clip-aware schedule: the
pilots first; those at 0 and 1 are also the outputs there, so it generates one strength more than
the grid). Optimisation is manual (several epochs per batch of rollouts).

Under ``strategy=ddp`` every rank generates its own rollouts (its own prompts, noise and actions);
the actions and rewards of all ranks (and the clip values that standardise q) are gathered,
so every rank computes the same q, advantages and loss on the same full batch, and the gains stay
identical without a gradient all-reduce.

The result, ``<run dir>/adapter`` (and ``export_to``), is the slider's adapter plus
``gain_schedule.safetensors``; ``rlmusic_pl.gain_schedule.load_gain_schedule`` (used by
``SweepModule``) applies it.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from rlmusic_pl.backbone.conditioning import PromptConditioning
from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.gain_schedule import CLIP_CONDITIONINGS, FEATURES, GAIN_SCHEDULE, Conditioning, GainSchedule, lora_channels, save_gain_schedule
from rlmusic_pl.lora import SCALE_WEIGHTS, LoRAError, LoRASettings, load_lora, lora_parameters, read_adapter_info
from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError, check_positive
from rlmusic_pl.modules.advantages import leave_one_out_advantages
from rlmusic_pl.modules.ppo import clipped_surrogate
from rlmusic_pl.modules.slider import AttributeProbe, attribute_probe_from, clip_attribute, generate_with_schedule
from rlmusic_pl.rewards.base import RewardResult
from rlmusic_pl.rewards.stability import (
    AttributeMonotonicityReward,
    SpectralStabilityReward,
    StrengthSweep,
    WeightedSweepReward,
    linearity,
)

def check_slider_settings(directory: Path, saved: LoRASettings, configured: LoRASettings) -> None:
    """LoRAError naming the slider directory and every LoRA setting that differs from the configured ones."""
    differ = [
        f"{name} {getattr(saved, name)!r} (configured {getattr(configured, name)!r})"
        for name in ("rank", "alpha", "targets")
        if (saved.target_pattern() != configured.target_pattern() if name == "targets" else getattr(saved, name) != getattr(configured, name))
    ]
    if differ:
        raise LoRAError(f"slider {directory}: its LoRA has {', '.join(differ)}; set lora_rank/lora_alpha/lora_targets to the slider's")


def within_context(rewards: Tensor, rollouts_per_context: int) -> Tensor:
    """Advantages [N] of rewards [N] grouped by context (``rollouts_per_context`` consecutive rollouts each):
    each reward's leave-one-out difference from the rest of its context, over the std of all of them."""
    differences = leave_one_out_advantages(rewards, rollouts_per_context)
    return differences / (differences.std() + 1e-6)


@dataclass
class PPOTerms:
    """The Stage-2 loss and its parts (all scalars)."""

    loss: Tensor
    surrogate: Tensor
    value_loss: Tensor
    entropy: Tensor
    gain_penalty: Tensor
    approx_kl: Tensor
    clipfrac: Tensor


@dataclass
class SweepRollouts:
    """One training step's rollouts: N = prompts x rollouts_per_prompt actions, each generated at G strengths."""

    actions: Tensor  # [N, D]
    waveforms: Tensor  # [G * N, T], strength-major
    rewards: RewardResult  # total and components [N]
    attribute: Tensor  # [G, N]
    prompts: list[str]  # [N]
    attributes: list[dict[str, str]]  # [N]


class ScalePPOModule(AudioLDM2Module):
    """Stage-2 PPO of a Stage-1 slider's scale layers, for smooth continuous strength control.

    Loads the slider (its LoRA settings must match ``lora_rank``/``lora_alpha``/``lora_targets``),
    freezes the base model and the LoRA A/B weights and trains a ``GainSchedule`` (initialised to
    the identity) with PPO against the sweep rewards. Any prompt data module works
    (``PromptAttributeDataModule``); validation generates each prompt from a fixed noise at the grid
    with the policy's mean and logs the rewards and the attribute's linearity (R², largest jump).

    Args:
        slider: directory of the Stage-1 slider (``SliderModule``'s exported adapter); its metadata
            must hold the attribute probe when ``monotonicity_weight`` is not 0 or a clip-aware
            schedule measures the probe.
        strengths: the strength grid of every rollout, increasing from 0 to 1.
        rollouts_per_prompt: actions per prompt and noise, in mirrored pairs (even, >= 2).
        conditioning: what the gain multipliers depend on: ``none``, ``strength``, ``strength_step``,
            ``interior`` (multipliers of the strength that are 1 at s = 1: the full-strength slider and its
            range stay Stage 1's, PPO bends only the strengths between) or ``power_position`` (the slider
            runs at strength ``|s|**exp(a + b |s| + c q)``, q the standardised log exponent of the clip's own
            plain sweep, read off its ``attribute`` at s = 0, 1/2 and 1: a clip that moves late is pushed on
            early, one that moves early held back; s = 0 and 1 stay Stage 1's).
        per_channel: one multiplier per output channel (else one per LoRA layer).
        shared_schedule: one multiplier for all LoRA layers (``GainSchedule(shared=True)``): a policy of
            just the conditioning's 2-4 coefficients, which reshapes the slider's strength curve as a
            whole; PPO fits it from a few rollouts per step.
        beta: exponent of the stability reward's SSIM target curve ``s**beta``.
        sigma: tolerance of the stability reward's Gaussian score (SSIM units; with
            ``relative_stability``, fractions of each rollout's own SSIM drop).
        relative_stability: score each rollout's SSIM drop relative to its own total drop
            (``SpectralStabilityReward(relative=True)``): informative when the slider changes the mel
            little, where the absolute score is ~1 for every rollout.
        attribute: what the monotonicity reward (and a clip-aware schedule's q) measures: ``probe`` (the slider's latent
            ``AttributeProbe``) or ``centroid`` (the decoded audio's spectral centroid, for a
            brightness slider whose audio should rise evenly).
        stability_weight: weight of the spectral-temporal stability reward.
        monotonicity_weight: weight of the attribute-monotonicity reward.
        init_std: initial standard deviation of the Gaussian policy (per coefficient).
        learn_std: learn the (log) standard deviation; else it stays ``init_std``.
        clip_range: PPO ratio clip epsilon.
        ppo_epochs: optimisation steps on each batch of rollouts.
        entropy_coef: weight of the policy's entropy (per coefficient) bonus.
        context_advantages: advantages relative to the other rollouts of the same prompt and noise
            (reward minus their mean, over the std of these differences) instead of the value baseline:
            the mirrored actions then differ only in theta, so differences between prompts, which can
            dwarf those between actions, drop out of the gradient.
        value_coef: weight of the value baseline's squared error (the baseline starts at the first
            batch's mean reward).
        gain_penalty: weight of the mean squared policy mean theta (multipliers' distance from 1).
        learning_rate: Adam learning rate of theta, the log-std and the value.
        duration_s: seconds of audio per clip.
        num_steps: DDIM steps per clip.
        guidance_scale: classifier-free guidance scale.
        start_fraction: fraction of the steps run at strength 0 before the slider is switched on.
        seed: seed of the rollouts' noise and actions (with the step and rank) and of validation noise.
        **backbone_args: see ``AudioLDM2Module`` (backbone, ``lora_targets`` default ``self_attention``
            as for ``SliderModule``, ``export_to``, ...).
    """

    trainable_state_prefixes = ("gain_schedule.", "log_std", "value")

    def __init__(
        self,
        slider: str,
        strengths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0],  # noqa: B006 (jsonargparse needs a list default)
        rollouts_per_prompt: int = 2,
        conditioning: Conditioning = "strength",
        per_channel: bool = False,
        shared_schedule: bool = False,
        beta: float = 1.0,
        sigma: float = 0.1,
        relative_stability: bool = False,
        attribute: Literal["probe", "centroid"] = "probe",
        stability_weight: float = 1.0,
        monotonicity_weight: float = 1.0,
        init_std: float = 0.1,
        learn_std: bool = True,
        clip_range: float = 0.2,
        ppo_epochs: int = 4,
        context_advantages: bool = False,
        entropy_coef: float = 0.0,
        value_coef: float = 0.5,
        gain_penalty: float = 0.1,
        learning_rate: float = 1e-2,
        duration_s: float = 10.0,
        num_steps: int = 50,
        guidance_scale: float = 3.5,
        start_fraction: float = 0.0,
        seed: int = 0,
        **backbone_args,
    ) -> None:
        backbone_args.setdefault("lora_targets", "self_attention")
        super().__init__(**backbone_args)
        if len(strengths) < 3 or strengths[0] != 0 or strengths[-1] != 1 or any(b <= a for a, b in itertools.pairwise(strengths)):
            raise ValueError(f"strengths must increase from 0 to 1 with at least one between, got {strengths}")
        if rollouts_per_prompt < 2 or rollouts_per_prompt % 2:
            raise ValueError(f"rollouts_per_prompt must be even and >= 2 (mirrored pairs), got {rollouts_per_prompt}")
        if conditioning not in FEATURES:
            raise ValueError(f"conditioning must be one of {sorted(FEATURES)}, got {conditioning!r}")
        if shared_schedule and per_channel:
            raise ValueError("shared_schedule and per_channel exclude each other: one multiplier for all layers, or one per channel")
        if attribute not in ("probe", "centroid"):
            raise ValueError(f"attribute must be 'probe' or 'centroid', got {attribute!r}")
        check_positive(init_std=init_std, clip_range=clip_range, ppo_epochs=ppo_epochs, duration_s=duration_s, num_steps=num_steps)
        if not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
        self.automatic_optimization = False
        self.reward = WeightedSweepReward(
            {"stability": SpectralStabilityReward(beta, sigma, relative_stability), "monotonicity": AttributeMonotonicityReward()},
            {"stability": stability_weight, "monotonicity": monotonicity_weight},
        )
        self.log_std = nn.Parameter(torch.tensor(float(init_std)).log(), requires_grad=learn_std)
        self.value = nn.Parameter(torch.zeros(()))
        self.gain_schedule: GainSchedule | None = None
        self.attribute_probe: AttributeProbe | None = None
        self.slider_info: dict = {}
        self.steps_sampled = 0

    # --------------------------------------------------------------------------- the slider
    def add_adapters(self, unet: nn.Module) -> None:
        """Load the Stage-1 slider with its own settings (checked against the configured ones) and freeze it."""
        directory = Path(self.hparams.slider)
        info = read_adapter_info(directory)  # LoRAError naming the directory if it is not an adapter
        if "settings" not in info:
            raise LoRAError(f"slider {directory}: {SCALE_WEIGHTS} holds no LoRA settings; train the slider with SliderModule")
        if (directory / GAIN_SCHEDULE).is_file():
            raise LoRAError(f"slider {directory}: is already a Stage-2 adapter (has {GAIN_SCHEDULE}); give the Stage-1 slider")
        saved = LoRASettings(**info["settings"])
        check_slider_settings(directory, saved, self.lora_settings)
        load_lora(unet, directory, settings=saved)
        for param in lora_parameters(unet):
            param.requires_grad_(False)
        self.slider_info = info

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        super().configure_model()
        unet = self.backbone.unet
        hp = self.hparams
        self.gain_schedule = GainSchedule(lora_channels(unet), hp.conditioning, hp.per_channel, self.backbone.scheduler.config.num_train_timesteps,
                                          hp.shared_schedule, hp.attribute if hp.conditioning in CLIP_CONDITIONINGS else None).to(self.device)
        self.gain_schedule.attach(unet)
        self.attribute_probe = self._slider_probe()

    def _slider_probe(self) -> AttributeProbe | None:
        probe = attribute_probe_from(self.slider_info)
        hp = self.hparams
        if probe is None and hp.attribute == "probe" and (hp.monotonicity_weight or hp.conditioning in CLIP_CONDITIONINGS):
            need = "the monotonicity reward" if hp.monotonicity_weight else f"conditioning {hp.conditioning!r}"
            raise LoRAError(f"slider {hp.slider}: its metadata has no attribute_probe, which {need} needs; export the slider "
                            "with SliderModule, or use attribute: centroid")
        return None if probe is None else probe.to(self.device)

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + [self.reward]

    def configure_optimizers(self):
        params = [self.gain_schedule.mean, self.value] + ([self.log_std] if self.hparams.learn_std else [])
        return torch.optim.Adam(params, lr=self.hparams.learning_rate)

    # --------------------------------------------------------------------------- the policy
    def policy(self) -> Normal:
        return Normal(self.gain_schedule.mean, self.log_std.exp())

    def sample_actions(self, contexts: int, generator: torch.Generator) -> Tensor:
        """``rollouts_per_prompt`` actions [contexts * k, D] per context, as mirrored pairs mean +- std * z."""
        half = self.hparams.rollouts_per_prompt // 2
        z = torch.randn(contexts, half, self.gain_schedule.mean.numel(), generator=generator).to(self.device)
        with torch.no_grad():
            return (self.gain_schedule.mean + self.log_std.exp() * torch.cat([z, -z], 1)).flatten(0, 1)

    def ppo_loss(self, actions: Tensor, old_log_prob: Tensor, advantages: Tensor, rewards: Tensor) -> PPOTerms:
        """Clipped surrogate + value loss - entropy bonus + gain penalty, for actions [N, D] and [N] the rest."""
        hp = self.hparams
        policy = self.policy()
        terms = clipped_surrogate(policy.log_prob(actions).sum(-1), old_log_prob, advantages, hp.clip_range)
        value_loss = (self.value - rewards).pow(2).mean()
        entropy = policy.entropy().mean()
        gain_penalty = self.gain_schedule.mean.pow(2).mean()
        loss = terms.loss + hp.value_coef * value_loss - hp.entropy_coef * entropy + hp.gain_penalty * gain_penalty
        return PPOTerms(loss, terms.loss, value_loss, entropy, gain_penalty, terms.approx_kl, terms.clipfrac)

    # --------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def generate(self, cond: PromptConditioning, noise: Tensor, actions: Tensor | None, observe: bool = False) -> Tensor:
        """Final latents [G * N, ...] (strength-major) of N contexts at the grid, rollout n with theta ``actions[n]`` (None: the
        mean); ``observe``: a clip-aware schedule folds these clips' raw values (every rank's) into q's statistics before
        it standardises them."""
        hp = self.hparams
        return generate_with_schedule(self.backbone, cond, noise, hp.strengths, hp.num_steps, hp.guidance_scale, hp.start_fraction,
                                      self.gain_schedule, actions, self.attribute_of, self.observe_clip_values if observe else None)

    def observe_clip_values(self, values: Tensor) -> None:
        """Fold every rank's raw clip values into the schedule's q statistics (the same on every rank, so q and the gains
        stay identical)."""
        self.gain_schedule.observe_context(*self._gather(values))

    def attribute_of(self, latents: Tensor, waveforms: Tensor | None = None) -> Tensor:
        """The monotonicity reward's attribute [B] of final latents [B, ...] (zeros without a probe when it is unused)."""
        hp = self.hparams
        if hp.attribute == "probe" and self.attribute_probe is None:
            return torch.zeros(latents.shape[0], device=latents.device)
        return clip_attribute(hp.attribute, self.backbone, latents, hp.duration_s, self.attribute_probe, waveforms)

    @torch.no_grad()
    def score(self, latents: Tensor) -> tuple[Tensor, RewardResult, Tensor]:
        """Waveforms [G * N, T], sweep rewards [N] and attribute [G, N] of grid latents [G * N, ...]."""
        hp = self.hparams
        groups = len(hp.strengths)
        waveforms = self.backbone.decode(latents, hp.duration_s).float()
        attribute = self.attribute_of(latents, waveforms).view(groups, -1)
        sweep = StrengthSweep(waveforms.view(groups, attribute.shape[1], -1), torch.tensor(hp.strengths, device=waveforms.device),
                              self.backbone.sample_rate, attribute)
        return waveforms, self.reward.evaluate(sweep), attribute

    def sample_rollouts(self, batch: dict, generator: torch.Generator) -> SweepRollouts:
        k = self.hparams.rollouts_per_prompt
        prompts = batch["prompt"]
        cond = self.backbone.encode_prompts(prompts, batch["negative_prompt"]).repeat_interleave(k)
        noise = self.backbone.initial_latents(len(prompts), self.hparams.duration_s, generator).repeat_interleave(k, 0)
        actions = self.sample_actions(len(prompts), generator)
        waveforms, rewards, attribute = self.score(self.generate(cond, noise, actions, observe=True))
        return SweepRollouts(actions, waveforms, rewards, attribute, [p for p in prompts for _ in range(k)],
                             [a for a in batch["attributes"] for _ in range(k)])

    # --------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        generator = torch.Generator().manual_seed(self.hparams.seed + 1_000_003 * self.steps_sampled + 7_919 * self.global_rank)
        rollouts = self.sample_rollouts(batch, generator)
        self.steps_sampled += 1
        metrics = self.train_on_rollouts(*self._gather(rollouts.actions, rollouts.rewards.total))
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        self.log("train/std", self.log_std.exp().detach(), on_step=True, on_epoch=False)
        return {"samples": self._sample_batch(rollouts.waveforms, rollouts.rewards, rollouts.prompts, rollouts.attributes)}

    def train_on_rollouts(self, actions: Tensor, rewards: Tensor) -> dict[str, Tensor]:
        """``ppo_epochs`` full-batch steps on one batch of rollouts (every rank's); the mean of each loss term."""
        optimizer = self.optimizers()
        with torch.no_grad():
            if self.steps_sampled == 1:  # a baseline of 0 would make every first advantage positive
                self.value.fill_(rewards.mean())
            old_log_prob = self.policy().log_prob(actions).sum(-1)
            if self.hparams.context_advantages:
                advantages = within_context(rewards, self.hparams.rollouts_per_prompt)
            else:
                advantages = (rewards - self.value) / (rewards.std() + 1e-6)
        history: dict[str, list[Tensor]] = {}
        for _ in range(self.hparams.ppo_epochs):
            terms = self.ppo_loss(actions, old_log_prob, advantages, rewards)
            optimizer.zero_grad()
            with self._no_gradient_sync():  # every rank has the same full batch, so the same gradient
                self.manual_backward(terms.loss)
            optimizer.step()
            for field in fields(terms):
                history.setdefault(field.name, []).append(getattr(terms, field.name).detach())
        return {name: torch.stack(values).mean() for name, values in history.items()}

    def _gather(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Every rank's tensors (each [N, ...]), concatenated in rank order (this rank's alone on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensors
        return tuple(self.all_gather(tensor).flatten(0, 1) for tensor in tensors)

    def _no_gradient_sync(self):
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    # --------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int) -> dict:
        """The policy's mean at the grid, from fixed noise per batch: rewards and the attribute's linearity."""
        hp = self.hparams
        prompts = batch["prompt"]
        generator = torch.Generator().manual_seed(hp.seed + 7_919 * batch_idx + self.global_rank)
        cond = self.backbone.encode_prompts(prompts, batch["negative_prompt"])
        noise = self.backbone.initial_latents(len(prompts), hp.duration_s, generator)
        waveforms, rewards, attribute = self.score(self.generate(cond, noise, None))
        r2, max_jump = linearity(attribute, torch.tensor(hp.strengths))
        for name, value in (("attribute_r2", r2), ("attribute_max_jump", max_jump), ("attribute_range", attribute[-1] - attribute[0])):
            self.log(f"{stage}/{name}", value.mean(), batch_size=len(prompts), sync_dist=True, prog_bar=name == "attribute_r2")
        return {"samples": self._sample_batch(waveforms, rewards, list(prompts), list(batch["attributes"]))}

    def _sample_batch(self, waveforms: Tensor, rewards: RewardResult, prompts: list[str], attributes: list[dict[str, str]]) -> SampleBatch:
        """Every clip of the grid, each carrying its rollout's rewards."""
        groups = len(self.hparams.strengths)
        values = {"total": rewards.total, **rewards.components}
        return SampleBatch(
            waveforms=waveforms.detach().cpu(),
            sample_rate=self.backbone.sample_rate,
            prompts=prompts * groups,
            attributes=attributes * groups,
            rewards={name: value.detach().cpu().repeat(groups) for name, value in values.items()},
            strengths=torch.tensor(self.hparams.strengths).repeat_interleave(len(prompts)),
        )

    # --------------------------------------------------------------------------- export
    def adapter_metadata(self) -> dict:
        stage1 = {k: v for k, v in self.slider_info.items() if k not in ("settings", "kind", "backbone")}
        return {**stage1, **super().adapter_metadata(), "slider": str(self.hparams.slider), "gain_schedule": self.gain_schedule.settings}

    def write_extra_adapter_files(self, directory: Path) -> None:
        save_gain_schedule(self.gain_schedule, directory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["scale_ppo"] = {"steps_sampled": self.steps_sampled}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "scale_ppo" not in checkpoint:
            raise CheckpointError("the checkpoint has no Stage-2 state (steps sampled): not saved by ScalePPOModule")
        self.steps_sampled = checkpoint["scale_ppo"]["steps_sampled"]
