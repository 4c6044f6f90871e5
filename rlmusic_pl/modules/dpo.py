"""Diffusion-DPO: offline preference optimisation of an AudioLDM2 LoRA (Wallace et al. 2023, arXiv 2311.12908;
Tango 2, arXiv 2404.09956; DESIGN.md section 13).

A training step, for a batch of B pairs (prompt, chosen clip x_w, rejected clip x_l):
  1. VAE latents (posterior mode) of both clips, each clip encoded once and cached by its file;
  2. one timestep t and one noise e per pair, both sides noised with them (``noised_pair``);
  3. one reference UNet call (the same UNet with the LoRA switched off, no gradient) and one policy
     call, each on the 2B noised latents at once, conditioned on the prompt alone;
  4. per-sample errors d = mean over elements of (e - e_hat)^2, and the loss
         -log sigma(-beta * w(t) * [(d_theta(x_w) - d_ref(x_w)) - (d_theta(x_l) - d_ref(x_l))]).

Choices (checked against Tango 2's ``DPOAudioDiffusion``, declare-lab/tango, and Diffusion-DPO's code):
- beta = 2000 (Tango 2's default ``beta_dpo``; Diffusion-DPO used 2500-5000 for images);
- w(t) = 1/2 for every t: both codes scale by ``-0.5 * beta`` (the paper's w(t) is constant in practice,
  its T factor folded into beta);
- errors are per-element means over the latent (``F.mse_loss(...).mean(dims)``), not sums, so beta does
  not depend on the clip length;
- timesteps uniform over the scheduler's training steps, the noise epsilon as target (both
  backbones here predict epsilon), conditioning on the prompt only (no negative prompt, no
  classifier-free guidance, no caption dropout, as in Tango 2's DPO step);
- a tie is learned as probability 1/2 either way: -(1/2) log sigma(z) - (1/2) log sigma(-z).

Validation generates clips of the held-out pairs' prompts (fixed noise per batch) and scores them with
the reward (and monitor rewards) through the shared sample callbacks, and reports the DPO loss and
implicit accuracy on the held-out pairs with fixed noise and timesteps.

Optimisation is automatic: the Trainer's ``precision``, ``accumulate_grad_batches`` and
``gradient_clip_val`` apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlmusic_pl.backbone.conditioning import TextConditioning
from rlmusic_pl.data.preferences import PreferenceDataError
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules.base import AudioLDM2Module, CheckpointError, check_positive
from rlmusic_pl.modules.reward_scoring import RewardScoring
from rlmusic_pl.modules.slider import noised_pair
from rlmusic_pl.rewards.base import Reward

PAIR_KEYS = ("chosen", "rejected", "chosen_audio", "rejected_audio", "tie")
DPO_WEIGHT = 0.5  # w(t), constant: Tango 2's and Diffusion-DPO's scale_term = -0.5 * beta


@dataclass
class DPOTerms:
    """The Diffusion-DPO loss of a batch of B pairs and what is logged beside it."""

    loss: Tensor  # scalar
    logits: Tensor  # [B] z = -beta w(t) [(d_theta_w - d_ref_w) - (d_theta_l - d_ref_l)]: the implicit reward margin
    policy_errors: Tensor  # [2B] d_theta, chosen then rejected
    reference_errors: Tensor  # [2B] d_ref, chosen then rejected

    @property
    def implicit_accuracy(self) -> Tensor:
        """Fraction of pairs whose chosen side the policy favours more than the reference does (z > 0; z = 0 counts 1/2)."""
        return ((self.logits > 0).float() + 0.5 * (self.logits == 0).float()).mean()


def dpo_loss(policy_errors: Tensor, reference_errors: Tensor, ties: Tensor, beta: float) -> DPOTerms:
    """Diffusion-DPO loss from per-sample errors [2B] (chosen then rejected) of the policy and the reference.

    ``ties`` [B] (bool): a tied pair's target probability is 1/2 instead of 1.
    """
    policy_w, policy_l = policy_errors.chunk(2)
    reference_w, reference_l = reference_errors.chunk(2)
    logits = -beta * DPO_WEIGHT * ((policy_w - reference_w) - (policy_l - reference_l))
    target = 1.0 - 0.5 * ties.to(logits.device, logits.dtype)
    loss = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    return DPOTerms(loss, logits, policy_errors, reference_errors)


class DiffusionDPOModule(RewardScoring, AudioLDM2Module):
    """Diffusion-DPO of a LoRA on the AudioLDM2 UNet from preference pairs; the reference is the LoRA switched off.

    Train with ``PromptAttributeDataModule(preferences=PreferencePairs(...))`` (e.g. Audio-Alpaca, or a
    set from ``python -m rlmusic_pl make-preferences``). The adapter is exported in diffusers' LoRA
    format to ``<run dir>/adapter`` and ``export_to``.

    Args:
        reward: scores the validation clips (e.g. ``CLAPReward``); it is never optimised.
        monitor_rewards: more rewards logged on the validation clips.
        beta: the DPO temperature beta (Tango 2: 2000).
        learning_rate: AdamW learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        cache_encodings: keep every clip's VAE latents and every prompt's text conditioning in CPU
            memory after first use (about 130 kB per 10 s clip and 300 kB per prompt at full size),
            so later epochs run only the UNet. Turn off for data sets too large for memory.
        duration_s: seconds of the validation clips (training clips are the data's ``duration_s``).
        val_samples_per_prompt: validation clips per held-out pair's prompt.
        val_num_steps: DDIM steps of validation clips.
        val_guidance_scale: classifier-free guidance scale of validation clips.
        val_eta: DDIM stochasticity of validation clips.
        seed: seed of the training draws (noise, timesteps; replayed on resume) and of the validation noise.
        **backbone_args: see ``AudioLDM2Module`` (backbone, LoRA rank/alpha/targets, ...).
    """

    hparams_ignore = ("reward", "monitor_rewards")

    def __init__(
        self,
        reward: Reward,
        monitor_rewards: list[Reward] | None = None,
        beta: float = 2000.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        cache_encodings: bool = True,
        duration_s: float = 10.0,
        val_samples_per_prompt: int = 1,
        val_num_steps: int = 50,
        val_guidance_scale: float = 3.5,
        val_eta: float = 1.0,
        seed: int = 0,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        check_positive(beta=beta, learning_rate=learning_rate, duration_s=duration_s, val_samples_per_prompt=val_samples_per_prompt,
                       val_num_steps=val_num_steps)
        self.init_scoring(reward, monitor_rewards, "DiffusionDPOModule")
        self.batches_trained = 0
        self._latents: dict[str, Tensor] = {}
        self._texts: dict[str, TextConditioning] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.check_rewards_at_setup(stage)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + [self.reward, self.monitor_rewards]

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(lora_parameters(self.backbone.unet), lr=hp.learning_rate, betas=tuple(hp.adam_betas),
                                 eps=hp.adam_eps, weight_decay=hp.weight_decay)

    def on_fit_start(self) -> None:
        preferences = getattr(self.trainer.datamodule, "preferences", None)
        if preferences is not None and preferences.sample_rate != self.backbone.sample_rate:
            raise PreferenceDataError(f"preferences.sample_rate is {preferences.sample_rate} Hz but the backbone's VAE reads "
                                      f"{self.backbone.sample_rate} Hz audio: set the preference pairs' sample_rate to {self.backbone.sample_rate}")

    # --------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.dpo_terms(batch, self.training_generator())
        self.batches_trained += 1
        self.log_terms("train", terms)
        return terms.loss

    def training_generator(self) -> torch.Generator:
        """Noise and timesteps of a training batch, determined by (seed, batches trained, rank): a resumed run draws them again."""
        return torch.Generator().manual_seed(self.hparams.seed + 1_000_003 * self.batches_trained + 7_919 * self.global_rank)

    def dpo_terms(self, batch: dict, generator: torch.Generator) -> DPOTerms:
        """The Diffusion-DPO loss of a batch of pairs, with the noise and timesteps drawn from ``generator``."""
        missing = set(PAIR_KEYS) - batch.keys()
        if missing:
            raise KeyError(f"DiffusionDPOModule needs preference pairs in its batches (missing {sorted(missing)}): "
                           "give the data module preferences=PreferencePairs(...)")
        chosen = self.clip_latents(batch["chosen"], batch["chosen_audio"])
        rejected = self.clip_latents(batch["rejected"], batch["rejected_audio"])
        pair = noised_pair(self.backbone, chosen, rejected, generator)
        text = self.prompt_texts(batch["prompt"])
        latents = torch.cat([pair.positive, pair.negative])
        timesteps = torch.cat([pair.timesteps, pair.timesteps])
        text = TextConditioning.cat([text, text])
        target = torch.cat([pair.noise, pair.noise]).float()
        with torch.no_grad(), lora_strength(self.backbone.unet, 0.0):
            reference = self.backbone.unet_noise(latents, timesteps, text)
        policy = self.backbone.unet_noise(latents, timesteps, text)
        return dpo_loss(per_sample_mse(policy, target), per_sample_mse(reference, target), batch["tie"], self.hparams.beta)

    @torch.no_grad()
    def clip_latents(self, files: list[str], audio: Tensor) -> Tensor:
        """VAE latents [B, C, T, F] (float32) of clips ``audio`` [B, samples], cached by their files."""
        if not self.hparams.cache_encodings:
            return self.backbone.waveform_to_latents(audio.to(self.device)).float()
        new = {file: index for index, file in enumerate(files) if file not in self._latents}
        if new:
            encoded = self.backbone.waveform_to_latents(audio[list(new.values())].to(self.device)).float().cpu()
            self._latents.update(zip(new, encoded))
        return torch.stack([self._latents[file] for file in files]).to(self.device)

    def prompt_texts(self, prompts: list[str]) -> TextConditioning:
        """Text conditioning of the prompts (positive side only), cached by prompt."""
        if not self.hparams.cache_encodings:
            return self.backbone.encode_texts(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._texts))
        if new:
            encoded = self.backbone.encode_texts(new).to("cpu")
            self._texts.update((prompt, encoded[index : index + 1]) for index, prompt in enumerate(new))
        return TextConditioning.cat([self._texts[p] for p in prompts]).to(self.device)

    def log_terms(self, stage: str, terms: DPOTerms) -> None:
        on_step = stage == "train"
        metrics = {"loss": terms.loss, "implicit_accuracy": terms.implicit_accuracy, "margin": terms.logits.mean(),
                   "policy_mse": terms.policy_errors.mean(), "reference_mse": terms.reference_errors.mean()}
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step,
                     batch_size=terms.logits.numel(), prog_bar=name in ("loss", "implicit_accuracy"))

    # --------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int) -> dict:
        """DPO terms of the held-out pairs (fixed draws) and scored clips of their prompts."""
        hp = self.hparams
        if set(PAIR_KEYS) <= batch.keys():
            self.log_terms(stage, self.dpo_terms(batch, torch.Generator().manual_seed(hp.seed + 7_919 * batch_idx + self.global_rank)))
        k = hp.val_samples_per_prompt
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        attributes = [a for a in batch["attributes"] for _ in range(k)]
        generator = self.evaluation_generator(batch_idx)
        cond = self.backbone.encode_prompts(prompts, [n for n in batch["negative_prompt"] for _ in range(k)])
        noise = self.backbone.initial_latents(len(prompts), hp.duration_s, generator)
        result = self.backbone.sample(cond, noise, hp.val_num_steps, hp.val_guidance_scale, hp.val_eta, generator)
        waveforms = self.backbone.decode(result.final, hp.duration_s)
        rewards = self.score(waveforms, prompts, attributes)
        self.log_rewards(stage, rewards)
        return {"samples": self.sample_batch(waveforms, prompts, attributes, rewards)}

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo"] = {"batches_trained": self.batches_trained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dpo")
        if state is None:
            raise CheckpointError("the checkpoint has no Diffusion-DPO state (batches trained): not saved by DiffusionDPOModule")
        self.batches_trained = state["batches_trained"]


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each sample [B] over all its other dimensions, in float32."""
    return (prediction.float() - target).pow(2).flatten(1).mean(1)
