"""MusicRL: KL-regularised RL of a MusicGen decoder LoRA from sequence-level rewards (Cideron et al. 2024; seed 003).

Each training step is one RL epoch over a batch of prompts:
  1. sample ``samples_per_prompt`` code sequences per prompt with the backbone's own loop (guidance,
     temperature 0.99, top-k), recording every code's log-probability, and decode them to audio;
  2. score the audio with the reward (and any monitor rewards, logged but not optimised);
  3. baselines: a learned value head on the decoder's hidden states, or advantages from statistics
     over every rank's prompts and rewards (leave-one-out or normalised groups, per-prompt running
     statistics, the batch);
  4. ``inner_epochs`` passes over shuffled minibatches of the objective below, with one teacher-forced
     pass of the policy (LoRA on) and one of the frozen reference (LoRA off, no gradient) per minibatch.

Objective (DESIGN.md §11), per sample, summed over the K codebooks and F frames of its codes,
averaged over samples:

    loss = (1 - kl_coef) * PG + kl_coef * KL + value_loss_coef * VF
    PG  = sum_t -A_t * r_t                  (r_t = pi(a_t) / pi_old(a_t): 1 on the first pass, so
                                             the gradient is -A_t grad log pi(a_t); with ``clip_range``,
                                             PPO's max(-A r, -A clip(r, 1 - eps, 1 + eps)))
    KL  = sum_t sum_v pi(v|s_t) (log pi(v|s_t) - log pi_0(v|s_t))   (exact, over the codebook)
    VF  = mean_t (R - V(s_t))^2             (value baseline only)

with the sequence's reward R as the return at every position (the reward comes at the end, with no
discount) and A_t = R - V(s_t) (value baseline) or the sample's advantage (other baselines).

Classifier-free guidance: with ``guidance_scale`` s != 1 the policy is the guided distribution
uncond + s (cond - uncond) (then temperature, top-k), so every training pass runs both halves in one
batch and scores exactly what was sampled; the reference is guided with the same s. With s = 1 no
guidance is used anywhere (half the decoder compute); the trained LoRA then describes the unguided
model, and generating from it with guidance afterwards is a different policy from the one trained.
The KL compares the distributions after guidance and temperature but before the top-k cut (the cut
supports of two models differ, which would make it infinite); the policy-gradient ratio uses the
cut distribution the codes were drawn from.

Optimisation is manual, so gradient accumulation and clipping are this module's arguments, not the
Trainer's; under DDP, prompts and rewards are gathered so every rank computes the same statistics,
and gradients are averaged over ranks once per optimizer step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rlmusic_pl.backbone.conditioning import MusicGenConditioning
from rlmusic_pl.backbone.musicgen import TokenScores
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules.backbone_module import CheckpointError, check_positive
from rlmusic_pl.modules.musicgen import MusicGenModule
from rlmusic_pl.modules.ppo import clipped_surrogate
from rlmusic_pl.modules.reward_rl import RewardRL
from rlmusic_pl.rewards.base import Reward, RewardResult

Baseline = Literal["value", "rloo", "group", "per_prompt", "batch"]
NORMALISED = ("group", "per_prompt", "batch")  # advantages in units of a standard deviation: clipped to +-adv_clip_max


@dataclass
class MusicRLRollouts:
    """The samples of one MusicRL epoch on this rank (B samples, K codebooks, F frames)."""

    codes: Tensor  # [B, K, F]
    log_probs: Tensor  # [B, K, F] under the sampling policy
    cond: MusicGenConditioning
    prompts: list[str]
    attributes: list[dict[str, str]]
    waveforms: Tensor  # [B, T]
    rewards: RewardResult
    advantages: Tensor | None = None  # [B]; with the value baseline, the return R (the value is subtracted per position)


@dataclass
class MusicRLTerms:
    """The loss of one minibatch and its parts (each a mean over the minibatch's samples)."""

    loss: Tensor
    policy_loss: Tensor  # PG, summed over positions
    kl: Tensor  # exact KL to the reference, summed over positions
    value_loss: Tensor  # mean over positions (0 without the value baseline)
    entropy: Tensor  # mean per position, of the policy before the top-k cut
    approx_kl: Tensor  # 0.5 mean (log r)^2, against the sampling policy
    clipfrac: Tensor
    log_probs: Tensor  # [n, K, F] the recomputed log-probs (for diagnostics), detached
    values: Tensor | None  # [n, K, F] the value head's predictions, detached


class MusicRLModule(RewardRL, MusicGenModule):
    """MusicRL fine-tuning of a LoRA on the MusicGen decoder (see the module docstring for the objective).

    Args:
        reward: the reward to maximise (e.g. ``CLAPReward``, ``WeightedReward`` of text adherence and
            quality as MusicRL-R; from Python also a plain function ``(waveforms, sample_rate, prompts,
            attributes) -> [B]``).
        monitor_rewards: rewards computed and logged on every epoch's samples but not optimised.
        duration_s: seconds of audio per sample.
        guidance_scale: classifier-free guidance scale s of sampling and training (1: no guidance; see
            the module docstring for what each choice trains).
        temperature: sampling temperature (MusicRL: 0.99).
        top_k: sample from the k most likely codes (None or 0: all).
        kl_coef: alpha, the weight of the exact KL to the frozen reference; the policy gradient gets 1 - alpha.
        baseline: ``value`` (a linear value head on the decoder's hidden states, trained by squared
            error to the return: MusicRL's), ``rloo`` (minus the mean reward of the prompt's other
            samples), ``group`` (normalised by the prompt's samples' mean/std, GRPO), ``per_prompt``
            (normalised by running statistics per prompt, DDPO's) or ``batch``.
        samples_per_prompt: samples of each prompt per epoch (``rloo``/``group`` need >= 2).
        sample_batch_size: samples generated per decoder batch.
        train_batch_size: samples per training minibatch.
        inner_epochs: optimisation passes over each epoch's samples (> 1 only makes sense with ``clip_range``).
        clip_range: PPO ratio clip epsilon against the sampling policy (None: no clipping).
        adv_clip_max: normalised advantages (``group``, ``per_prompt``, ``batch``) are clipped to +-this.
        stat_buffer_size: rewards kept per prompt for ``per_prompt`` statistics.
        stat_min_count: rewards a prompt needs before its own statistics replace the batch's.
        value_loss_coef: weight of the value head's squared error (it trains only the head: its input is detached).
        value_learning_rate: AdamW learning rate of the value head.
        learning_rate: AdamW learning rate of the LoRA.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        gradient_accumulation: training minibatches per optimizer step. Replaces the Trainer's
            ``accumulate_grad_batches``.
        max_grad_norm: gradient norm clipping (0 disables), of the LoRA and of the value head separately.
            Replaces the Trainer's ``gradient_clip_val``.
        seed: seed of sampling and of the training shuffles (with the step and rank).
        **backbone_args: see ``MusicGenModule`` (backbone, LoRA rank/alpha/targets, ...).
    """

    hparams_ignore = ("reward", "monitor_rewards")
    trainable_state_prefixes = ("value_head.",)

    def __init__(
        self,
        reward: Reward,
        monitor_rewards: list[Reward] | None = None,
        duration_s: float = 10.0,
        guidance_scale: float = 3.0,
        temperature: float = 0.99,
        top_k: int | None = 250,
        kl_coef: float = 0.1,
        baseline: Baseline = "value",
        samples_per_prompt: int = 1,
        sample_batch_size: int = 4,
        train_batch_size: int = 1,
        inner_epochs: int = 1,
        clip_range: float | None = None,
        adv_clip_max: float = 5.0,
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        value_loss_coef: float = 1.0,
        value_learning_rate: float = 1e-3,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        gradient_accumulation: int = 1,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        check_positive(duration_s=duration_s, temperature=temperature, samples_per_prompt=samples_per_prompt,
                       sample_batch_size=sample_batch_size, train_batch_size=train_batch_size, inner_epochs=inner_epochs,
                       gradient_accumulation=gradient_accumulation, adv_clip_max=adv_clip_max)
        if clip_range is not None:
            check_positive(clip_range=clip_range)
        if not 0 <= kl_coef <= 1:
            raise ValueError(f"kl_coef (alpha) must be in [0, 1], got {kl_coef}")
        if baseline not in ("value", "rloo", "group", "per_prompt", "batch"):
            raise ValueError(f"baseline must be one of value, rloo, group, per_prompt, batch; got {baseline!r}")
        if baseline in ("rloo", "group") and samples_per_prompt < 2:
            raise ValueError(f"baseline={baseline!r} needs samples_per_prompt >= 2")
        self.automatic_optimization = False
        self.init_rewards(reward, monitor_rewards, "MusicRLModule", stat_buffer_size, stat_min_count)
        self.value_head: nn.Linear | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.baseline == "value" and self.value_head is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.hparams.backbone_seed)
                self.value_head = nn.Linear(self.backbone.decoder.config.hidden_size, 1).to(self.device)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": lora_parameters(self.backbone.decoder), "lr": hp.learning_rate}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": hp.value_learning_rate})
        return torch.optim.AdamW(groups, betas=tuple(hp.adam_betas), eps=hp.adam_eps, weight_decay=hp.weight_decay)

    # --------------------------------------------------------------------------- the MusicRL epoch
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        rollouts = self.sample_rollouts(batch, self.seeded_generator("sample"))
        rollouts.advantages = self.compute_advantages(rollouts)
        metrics = self.train_on_rollouts(rollouts)
        self.epochs_sampled += 1
        self.log_rewards("train", rollouts.rewards)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in ("loss", "kl"))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return {"samples": self._sample_batch(rollouts)}

    def sample_rollouts(self, batch: dict, generator: torch.Generator) -> MusicRLRollouts:
        """Sample ``samples_per_prompt`` code sequences per prompt with the policy, decode and score them."""
        hp = self.hparams
        k = hp.samples_per_prompt
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        attributes = [a for a in batch["attributes"] for _ in range(k)]
        num_frames = self.backbone.num_frames(hp.duration_s)
        codes, log_probs, conds, waveforms = [], [], [], []
        for start in range(0, len(prompts), hp.sample_batch_size):
            cond = self.backbone.encode_prompts(prompts[start : start + hp.sample_batch_size])
            sample = self.backbone.sample(cond, num_frames, hp.guidance_scale, hp.temperature, hp.top_k, generator=generator)
            codes.append(sample.codes)
            log_probs.append(sample.log_probs)
            conds.append(cond)
            waveforms.append(self.backbone.decode(sample.codes))
        waveforms = torch.cat(waveforms)
        return MusicRLRollouts(
            codes=torch.cat(codes), log_probs=torch.cat(log_probs), cond=MusicGenConditioning.cat(conds), prompts=prompts,
            attributes=attributes, waveforms=waveforms, rewards=self.score(waveforms, prompts, attributes),
        )

    def compute_advantages(self, rollouts: MusicRLRollouts) -> Tensor:
        """Per-sample advantages [B] (the return R itself with the value baseline)."""
        hp = self.hparams
        rewards = rollouts.rewards.total.to(self.device)
        if hp.baseline == "value":
            return rewards
        advantages = self.advantages_from_rewards(rollouts.prompts, rewards, hp.baseline, hp.samples_per_prompt)
        return advantages.clamp(-hp.adv_clip_max, hp.adv_clip_max) if hp.baseline in NORMALISED else advantages

    def train_on_rollouts(self, rollouts: MusicRLRollouts) -> dict[str, Tensor]:
        """``inner_epochs`` passes of the MusicRL loss over shuffled minibatches; the epoch's mean diagnostics."""
        hp = self.hparams
        optimizer = self.optimizers()
        generator = self.seeded_generator("train")
        batch = len(rollouts.prompts)
        history: dict[str, list[Tensor]] = defaultdict(list)
        values = torch.zeros_like(rollouts.log_probs)
        minibatches = 0
        for _ in range(hp.inner_epochs):
            order = torch.randperm(batch, generator=generator).to(self.device)
            for start in range(0, batch, hp.train_batch_size):
                rows = order[start : start + hp.train_batch_size]
                with self.no_gradient_sync():
                    terms = self.loss_terms(rollouts, rows)
                    self.manual_backward(terms.loss * (len(rows) / (hp.train_batch_size * hp.gradient_accumulation)))
                for name in ("loss", "policy_loss", "kl", "value_loss", "entropy", "approx_kl", "clipfrac"):
                    history[name].append(getattr(terms, name).detach())
                if terms.values is not None:
                    values[rows] = terms.values
                minibatches += 1
                if minibatches % hp.gradient_accumulation == 0:
                    optimizer.step()
                    optimizer.zero_grad()
        if minibatches % hp.gradient_accumulation:
            optimizer.step()
            optimizer.zero_grad()
        metrics = {name: torch.stack(items).mean() for name, items in history.items()}
        if hp.baseline != "value":
            del metrics["value_loss"]
        else:
            metrics["explained_variance"] = explained_variance(values, rollouts.advantages[:, None, None].expand_as(values))
        if hp.clip_range is None:
            del metrics["clipfrac"]
        return metrics

    def loss_terms(self, rollouts: MusicRLRollouts, rows: Tensor) -> MusicRLTerms:
        """The MusicRL loss of the samples ``rows`` (module docstring), differentiable in the LoRA and the value head."""
        hp = self.hparams
        codes = rollouts.codes[rows]
        scores = self.policy_scores(rollouts, rows)
        reference = self.reference_distributions(codes, rollouts.cond[rows.cpu()])
        per_sample = codes.shape[1] * codes.shape[2]  # positions per sample: the surrogate's mean becomes a sum
        returns = rollouts.advantages[rows][:, None, None].expand_as(scores.log_probs)
        values = None
        if hp.baseline == "value":
            values = self.value_head(scores.hidden_states.detach().float())[..., 0].float()  # autocast runs the head in half precision
            advantages = returns - values.detach()
            value_loss = ((values - returns) ** 2).mean()
        else:
            advantages, value_loss = returns, returns.new_zeros(())
        clip = hp.clip_range if hp.clip_range is not None else float("inf")
        surrogate = clipped_surrogate(scores.log_probs, rollouts.log_probs[rows], advantages, clip)
        policy_loss = surrogate.loss * per_sample
        distributions = scores.distributions
        kl = exact_kl(distributions, reference).sum((1, 2)).mean()
        loss = (1 - hp.kl_coef) * policy_loss + hp.kl_coef * kl + hp.value_loss_coef * value_loss
        with torch.no_grad():
            entropy = -(distributions.exp() * distributions).sum(-1).mean()
        return MusicRLTerms(
            loss=loss, policy_loss=policy_loss, kl=kl, value_loss=value_loss, entropy=entropy, approx_kl=surrogate.approx_kl,
            clipfrac=surrogate.clipfrac, log_probs=scores.log_probs.detach(), values=None if values is None else values.detach(),
        )

    def policy_scores(self, rollouts: MusicRLRollouts, rows: Tensor) -> TokenScores:
        """The policy's teacher-forced scores of the samples ``rows``: log-probs of the sampled (top-k cut)
        policy, distributions before the cut (for the KL), hidden states (for the value head).

        Before any update the log-probs equal those recorded while sampling: each sample is scored with
        its own stored conditioning, under the same guidance, temperature and top-k.
        """
        hp = self.hparams
        return self.backbone.log_probs(
            rollouts.codes[rows], rollouts.cond[rows.cpu()], hp.guidance_scale, hp.temperature, hp.top_k, return_distributions=True,
            distributions_before_top_k=True, return_hidden_states=hp.baseline == "value",
        )

    @torch.no_grad()
    def reference_distributions(self, codes: Tensor, cond: MusicGenConditioning) -> Tensor:
        """Log-distributions [B, K, F, V] of the frozen reference pi_0 (the LoRA switched off), guided as the policy is."""
        hp = self.hparams
        with lora_strength(self.backbone.decoder, 0.0):
            return self.backbone.log_probs(codes, cond, hp.guidance_scale, hp.temperature, hp.top_k, return_distributions=True,
                                           distributions_before_top_k=True).distributions

    # --------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int) -> dict:
        rollouts = self.sample_rollouts(batch, self.evaluation_generator(batch_idx))
        self.log_rewards(stage, rollouts.rewards)
        return {"samples": self._sample_batch(rollouts)}

    def _sample_batch(self, rollouts: MusicRLRollouts):
        return self.sample_batch(rollouts.waveforms, rollouts.prompts, rollouts.attributes, rollouts.rewards)

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["musicrl"] = {"stat_tracker": self.stat_tracker.state_dict(), "epochs_sampled": self.epochs_sampled}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("musicrl")
        if state is None:
            raise CheckpointError("the checkpoint has no MusicRL state (per-prompt statistics, counters): not saved by MusicRLModule")
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.epochs_sampled = state["epochs_sampled"]


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities (finite where p > 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def explained_variance(predictions: Tensor, targets: Tensor) -> Tensor:
    """1 - Var(targets - predictions) / Var(targets): 1 for perfect predictions, 0 for the mean, NaN for constant targets."""
    return 1 - (targets - predictions).var() / targets.var()
