"""Does MusicRL learn, and what does the KL coefficient trade? Held-out reward and KL for several alphas, side by side.

For each ``--kl-coefs`` value alpha, the same fresh LoRA (same seeds) is trained for ``--epochs``
MusicRL epochs on the training prompts, then evaluated on a fixed held-out batch: held-out prompts
(other pitch classes than the training prompts) with sampling noise no training epoch draws
(generator seed 10,000 + seed). Printed per alpha: the held-out mean reward before and after, the
change in held-out standard deviations, and the exact KL to the reference (the LoRA switched off),
summed over a clip's codes and averaged over the held-out clips; plus the training reward and KL per
epoch. alpha = 0 is the unregularised policy gradient: it should drift furthest.

The random tiny preset decodes every code sequence to nearly the same audio, so no reward moves on
it; use a trained tiny MusicGen (``benchmarks/train_tiny_musicgen.py``), whose prompts name a pitch
class and a timbre ("a bright C note"):

    python benchmarks/musicrl_learning.py --backbone runs/tiny-musicgen-trained --reward pitch --kl-coefs 0 0.05 0.3
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from lightning import Callback, Trainer

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.synthetic import ROLLOFF, NoteLabel
from rlmusic_pl.modules import MusicRLModule
from rlmusic_pl.modules.musicrl import exact_kl
from rlmusic_pl.rewards import PitchClassReward, SpectralCentroidReward, WeightedReward

REWARDS = {
    "pitch": PitchClassReward,  # the share of the clip's chroma in the prompt's pitch class
    "centroid": SpectralCentroidReward,
    "dull": lambda: WeightedReward({"centroid": SpectralCentroidReward()}, {"centroid": -1.0}, name="dull"),
}
TRAIN_CLASSES = [0, 2, 4, 6, 8, 10]  # C D E F# G# A#
HELD_OUT_CLASSES = [1, 3, 5, 7, 9, 11]  # C# D# F G A B


def prompts_of(classes: list[int]) -> list[dict]:
    """The synthetic notes' prompts ("a bright C note") and attributes, both brightnesses of each pitch class."""
    labels = [NoteLabel(pc, brightness=brightness) for pc in classes for brightness in sorted(ROLLOFF)]
    return [{"prompt": label.prompt(), "attributes": label.attributes()} for label in labels]


class History(Callback):
    """Training reward and KL of every epoch."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.kls: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rewards.append(outputs["samples"].rewards["total"].mean().item())
        self.kls.append(trainer.callback_metrics["train/kl"].item())


@torch.no_grad()
def held_out(module: MusicRLModule, items: list[dict], samples_per_prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [n] and exact KL to the reference [n] (summed over codes) of a fixed held-out batch."""
    batch = {"prompt": [i["prompt"] for i in items], "attributes": [i["attributes"] for i in items]}
    previous = module.hparams.samples_per_prompt
    module.hparams.samples_per_prompt = samples_per_prompt
    rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(10_000 + seed))
    module.hparams.samples_per_prompt = previous
    kls = []
    for start in range(0, len(rollouts.prompts), 16):
        rows = torch.arange(start, min(start + 16, len(rollouts.prompts)))
        policy = module.policy_scores(rollouts, rows).distributions
        kls.append(exact_kl(policy, module.reference_distributions(rollouts.codes[rows], rollouts.cond[rows])).sum((1, 2)))
    return rollouts.rewards.total, torch.cat(kls)


def run(kl_coef: float, args: argparse.Namespace) -> dict:
    module = MusicRLModule(
        REWARDS[args.reward](), backbone=args.backbone, duration_s=args.duration, guidance_scale=args.guidance, temperature=0.99,
        top_k=args.top_k, kl_coef=kl_coef, baseline=args.baseline, samples_per_prompt=args.samples_per_prompt, sample_batch_size=24,
        train_batch_size=args.train_batch_size, learning_rate=args.lr, value_learning_rate=1e-2, lora_rank=8, lora_alpha=8.0,
        lora_targets=args.targets, seed=args.seed, max_grad_norm=1.0, text_length=16,
    )
    module.configure_model()
    items = prompts_of(HELD_OUT_CLASSES)
    before, kl_before = held_out(module, items, args.held_out_samples, args.seed)
    history = History()
    data = PromptAttributeDataModule(prompts=prompts_of(TRAIN_CLASSES), batch_size=args.prompts_per_epoch, seed=args.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(accelerator="cpu", max_steps=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir, callbacks=[history]).fit(module, data)
    after, kl_after = held_out(module, items, args.held_out_samples, args.seed)
    return {"before": before, "after": after, "kl_before": kl_before, "kl_after": kl_after, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random weights) or a MusicGen directory, e.g. from benchmarks/train_tiny_musicgen.py")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="pitch", help="the cheap deterministic reward to optimise")
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.05, 0.3], help="alpha values to compare, each from the same fresh LoRA")
    parser.add_argument("--epochs", type=int, default=30, help="MusicRL epochs (optimizer steps: one minibatch of all of an epoch's samples)")
    parser.add_argument("--prompts-per-epoch", type=int, default=4, help="training prompts per epoch")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="samples of each training prompt per epoch")
    parser.add_argument("--train-batch-size", type=int, default=16, help="samples per minibatch (= optimizer step)")
    parser.add_argument("--baseline", default="rloo", choices=["value", "rloo", "group", "per_prompt", "batch"], help="MusicRLModule baseline")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the LoRA")
    parser.add_argument("--targets", default="attention", help="LoRA targets (preset or regex)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of audio per sample")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (sampling and training)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k of sampling (0: the whole codebook)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training draws and shuffles; held-out noise uses 10,000 + seed")
    parser.add_argument("--held-out-samples", type=int, default=4, help="held-out samples per held-out prompt (12 prompts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = {alpha: run(alpha, args) for alpha in args.kl_coefs}
    print(f"backbone={args.backbone} reward={args.reward} baseline={args.baseline} epochs={args.epochs} lr={args.lr} seed={args.seed} "
          f"prompts/epoch={args.prompts_per_epoch} samples/prompt={args.samples_per_prompt} guidance={args.guidance} top_k={args.top_k}")
    held_out_names = " ".join(NoteLabel(pc).name for pc in HELD_OUT_CLASSES)
    print(f"held-out: prompts of pitch classes {held_out_names} (bright, dull) x {args.held_out_samples} samples, noise seed {10_000 + args.seed}")
    print("| alpha | held-out reward before | after | change (held-out std) | held-out KL before | after |")
    print("|---:|---:|---:|---:|---:|---:|")
    for alpha, r in results.items():
        gain = (r["after"].mean() - r["before"].mean()) / r["before"].std()
        print(f"| {alpha:g} | {r['before'].mean():.4f} | {r['after'].mean():.4f} | {gain:+.2f} | {r['kl_before'].mean():.3f} | {r['kl_after'].mean():.3f} |")
    for alpha, r in results.items():
        print(f"alpha={alpha:g} training reward per epoch: " + " ".join(f"{m:.3f}" for m in r["history"].rewards))
        print(f"alpha={alpha:g} training KL per epoch:     " + " ".join(f"{m:.2f}" for m in r["history"].kls))


if __name__ == "__main__":
    main()
