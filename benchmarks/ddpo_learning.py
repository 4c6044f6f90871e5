"""Does DDPO learn? Train the tiny backbone on a cheap deterministic reward; compare held-out reward before/after.

The held-out batch is fixed: its own prompts and its own initial noise (a generator seeded apart from
training), sampled with the same DDIM settings. Prints the held-out mean reward before training,
after training, and their difference in held-out standard deviations.

On the random tiny preset (``--backbone tiny``) the rewards barely move (``tiny_reward_sensitivity.py``);
train the tiny architecture first, then run DDPO on it (about 8 minutes on one thread):

    python benchmarks/train_tiny_backbone.py runs/tiny-trained
    python benchmarks/ddpo_learning.py --backbone runs/tiny-trained --reward centroid --steps 10 \
        --epochs 25 --lr 1e-3 --held-out-prompts
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from lightning import Callback, Trainer

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.modules import DDPOModule
from rlmusic_pl.rewards import BandEnergyReward, LoudnessReward, SpectralCentroidReward, SpectralFluxReward, WeightedReward

REWARDS = {
    "loudness": LoudnessReward,
    "centroid": SpectralCentroidReward,
    "low_band": lambda: BandEnergyReward(0.0, 500.0, name="low_band"),
    "flux": SpectralFluxReward,
    "steady": lambda: WeightedReward({"flux": SpectralFluxReward()}, {"flux": -1.0}, name="steady"),
    "dull": lambda: WeightedReward({"centroid": SpectralCentroidReward()}, {"centroid": -1.0}, name="dull"),
}

TRAIN_PROMPTS = ["a bright piano", "a calm guitar", "an angry drum", "a happy violin"]
HELD_OUT_PROMPTS = ["a soft flute", "a loud trumpet", "a sad cello", "a tender harp"]


class RewardHistory(Callback):
    """Mean training reward of every DDPO epoch."""

    def __init__(self) -> None:
        self.means: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.means.append(outputs["samples"].rewards["total"].mean().item())


def held_out_reward(module: DDPOModule, prompts: list[str], samples_per_prompt: int, seed: int) -> torch.Tensor:
    """Reward of a fixed batch: ``prompts`` with initial noise no training epoch draws."""
    batch = {"prompt": prompts, "negative_prompt": ["noise"] * len(prompts), "attributes": [{}] * len(prompts)}
    previous = module.hparams.samples_per_prompt
    module.hparams.samples_per_prompt = samples_per_prompt
    rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(10_000 + seed))
    module.hparams.samples_per_prompt = previous
    return rollouts.rewards.total


def build(seed: int, args: argparse.Namespace) -> DDPOModule:
    module = DDPOModule(
        REWARDS[args.reward](), backbone=args.backbone, duration_s=args.duration, num_steps=args.steps, samples_per_prompt=args.samples_per_prompt,
        sample_batch_size=16, train_batch_size=16, timestep_fraction=1.0, learning_rate=args.lr, clip_range=args.clip_range,
        stat_min_count=8, lora_rank=8, lora_alpha=8.0, lora_targets=args.targets, seed=seed, max_grad_norm=1.0,
        inner_epochs=args.inner_epochs,
    )
    module.configure_model()
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random weights) or a directory, e.g. from benchmarks/train_tiny_backbone.py")
    parser.add_argument("--epochs", type=int, default=12, help="DDPO epochs (one batch of the 4 training prompts each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training noise and shuffles")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--clip-range", type=float, default=0.2, help="PPO ratio clip")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of audio per sample")
    parser.add_argument("--steps", type=int, default=6, help="DDIM steps")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="flux", help="the cheap deterministic reward to optimise")
    parser.add_argument("--targets", default="attention+conv", help="LoRA targets (preset or regex)")
    parser.add_argument("--inner-epochs", type=int, default=2, help="optimisation passes per DDPO epoch")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="samples of each of the 4 training prompts per epoch")
    parser.add_argument("--held-out-prompts", action="store_true", help="evaluate on other prompts (default: the training prompts with held-out noise)")
    parser.add_argument("--held-out-samples", type=int, default=4, help="held-out samples per held-out prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    module = build(args.seed, args)
    prompts = HELD_OUT_PROMPTS if args.held_out_prompts else TRAIN_PROMPTS
    before = held_out_reward(module, prompts, args.held_out_samples, args.seed)
    history = RewardHistory()
    data = PromptAttributeDataModule(prompts=TRAIN_PROMPTS, negative_prompt="noise", batch_size=4, seed=args.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir, callbacks=[history]).fit(module, data)
    after = held_out_reward(module, prompts, args.held_out_samples, args.seed)
    gain = (after.mean() - before.mean()) / before.std()
    print(f"backbone={args.backbone} seed={args.seed} epochs={args.epochs} lr={args.lr} clip={args.clip_range} reward={args.reward} targets={args.targets}")
    print("training reward per epoch: " + " ".join(f"{m:.4f}" for m in history.means))
    print(f"held-out batch: {'other prompts' if args.held_out_prompts else 'training prompts'}, noise seed {10_000 + args.seed}")
    print(f"held-out mean reward before: {before.mean():.4f} (std {before.std():.4f}, n={before.numel()})")
    print(f"held-out mean reward after:  {after.mean():.4f} (std {after.std():.4f}, n={after.numel()})")
    print(f"change: {after.mean() - before.mean():+.4f} = {gain:+.2f} held-out std")


if __name__ == "__main__":
    main()
