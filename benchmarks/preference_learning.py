"""Learning from preferences against a hidden judge: a Bradley-Terry reward model, then DDPO on it at several kl_coef.

1. Preference sets (``make-preferences``'s code) from the backbone: k clips per prompt, judged by the
   hidden judge (spectral centroid), every pair labelled by sampling sigma((judge(a) - judge(b)) / T) with
   T chosen so that labels agree with the judge's noise-free ranking ``--agreement`` of the time. The
   held-out set has its own prompts and clips, labelled at the same T; the ceiling of any reward model's
   held-out accuracy is how often its labels agree with the judge's ranking.
2. ``PreferenceRewardModule`` (log-mel statistics encoder) fitted on the training pairs; held-out pair
   accuracy, loss and calibration error; exported and loaded as ``PreferenceReward``.
3. DDPO (``benchmarks/ddpo_learning.py``'s settings) optimising the *learned* reward only, once per
   ``--kl-coefs`` value, from the same start. On held-out prompts and noise before and after: the learned
   reward, the judge (never seen by DDPO), and the per-step KL to the starting model (closed-form,
   averaged over every step of the held-out trajectories).

    python benchmarks/train_tiny_backbone.py runs/tiny-trained
    nice -n 5 python benchmarks/preference_learning.py --backbone runs/tiny-trained --out runs/preference_learning
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer

from rlmusic_pl.data import PreferencePairs, PromptAttributeDataModule
from rlmusic_pl.data.prompts import parse_entry
from rlmusic_pl.modules import DDPOModule, PreferenceRewardModule
from rlmusic_pl.preference_sets import ClipGenerator, make_preference_set
from rlmusic_pl.rewards import MelStatisticsEncoder, PreferenceReward, SpectralCentroidReward

PREFERENCE_PROMPTS = ["a bright piano", "a calm guitar", "an angry drum", "a happy violin", "a soft organ", "a dark synth",
                      "a gentle bell", "a lively banjo", "a slow bass", "a clear marimba", "a warm horn", "a thin whistle"]
RM_HELD_OUT_PROMPTS = ["a quiet oboe", "a sharp snare", "a mellow cello", "a shiny glockenspiel"]
DDPO_PROMPTS = PREFERENCE_PROMPTS[:4]
HELD_OUT_PROMPTS = ["a soft flute", "a loud trumpet", "a sad cello", "a tender harp"]
NEGATIVE = "noise"


class History(Callback):
    """Per DDPO epoch: mean learned reward, mean judge and the logged KL to the reference."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rewards = outputs["samples"].rewards
        self.rows.append((rewards["total"].mean().item(), rewards["monitor/judge"].mean().item(),
                          trainer.callback_metrics["train/kl_to_reference"].item()))


def preference_sets(args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    clips = ClipGenerator("audioldm2", args.backbone, duration_s=args.duration, num_steps=args.steps, batch_size=16)
    judge = SpectralCentroidReward()

    def items(prompts):
        return [{**parse_entry(p, "prompt"), "negative_prompt": NEGATIVE} for p in prompts]

    train = make_preference_set(out / "train", items(PREFERENCE_PROMPTS[: args.prompts]), clips, judge, args.clips_per_prompt,
                                agreement=args.agreement, seed=args.seed)
    held_out = make_preference_set(out / "held_out", items(RM_HELD_OUT_PROMPTS), clips, judge, args.clips_per_prompt,
                                   temperature=train["temperature"], seed=args.seed + 1000)
    return train, held_out


def fit_reward_model(args: argparse.Namespace, out: Path) -> dict:
    def loader(name: str, split: str):
        data = PromptAttributeDataModule(preferences=PreferencePairs(str(out / name / "pairs.jsonl"), duration_s=args.duration),
                                         batch_size=32, seed=args.seed)
        return data.train_dataloader() if split == "train" else data.val_dataloader()

    module = PreferenceRewardModule(MelStatisticsEncoder(text_dim=32), hidden_dim=64, dropout=0.1, learning_rate=args.rm_lr,
                                    weight_decay=1e-2, seed=args.seed, export_to=str(out / "reward_model"))
    trainer = Trainer(accelerator="cpu", max_epochs=args.rm_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=args.rm_epochs,
                      default_root_dir=out / "rm")
    trainer.fit(module, loader("train", "train"), loader("held_out", "val"))
    train_accuracy = trainer.validate(module, loader("train", "val"), verbose=False)[0]["val/accuracy"]
    held_out = trainer.validate(module, loader("held_out", "val"), verbose=False)[0]
    return {**{k.removeprefix("val/"): v for k, v in held_out.items()}, "train_accuracy": train_accuracy}


@torch.no_grad()
def held_out_evaluation(module: DDPOModule, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Learned reward and judge [n] of a fixed held-out batch, and its mean per-step KL to the reference."""
    batch = {"prompt": HELD_OUT_PROMPTS, "negative_prompt": [NEGATIVE] * len(HELD_OUT_PROMPTS), "attributes": [{}] * len(HELD_OUT_PROMPTS)}
    rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(10_000 + args.seed))
    module.backbone.set_timesteps(module.hparams.num_steps)
    rows = torch.arange(len(rollouts.prompts))
    kl = torch.stack([module.kl_to_reference(rollouts, rows, torch.full_like(rows, step), *module.step_distribution(rollouts, rows, torch.full_like(rows, step)))
                      for step in range(rollouts.log_probs.shape[1])])
    return {"learned": rollouts.rewards.total, "judge": rollouts.rewards.components["monitor/judge"], "kl": kl.mean()}


def ddpo(args: argparse.Namespace, reward_dir: Path, kl_coef: float) -> tuple[dict, dict, list]:
    module = DDPOModule(
        PreferenceReward(checkpoint=str(reward_dir)), monitor_rewards=[SpectralCentroidReward(name="judge")], kl_coef=kl_coef,
        backbone=args.backbone, duration_s=args.duration, num_steps=args.steps, samples_per_prompt=4, sample_batch_size=16,
        train_batch_size=16, timestep_fraction=1.0, learning_rate=args.lr, clip_range=0.2, stat_min_count=8, lora_rank=8,
        lora_alpha=8.0, lora_targets="attention+conv", seed=args.seed, max_grad_norm=1.0, inner_epochs=2,
    )
    module.configure_model()
    before = held_out_evaluation(module, args)
    history = History()
    data = PromptAttributeDataModule(prompts=DDPO_PROMPTS, negative_prompt=NEGATIVE, batch_size=len(DDPO_PROMPTS), seed=args.seed)
    Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=args.out / "ddpo", callbacks=[history]).fit(module, data)
    return before, held_out_evaluation(module, args), history.rows


def change(before: torch.Tensor, after: torch.Tensor) -> str:
    return f"{before.mean():.4f} -> {after.mean():.4f} ({(after.mean() - before.mean()) / before.std():+.2f} std)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="runs/tiny-trained", help="backbone directory (benchmarks/train_tiny_backbone.py) or 'tiny'")
    parser.add_argument("--out", type=Path, default=Path("runs/preference_learning"), help="where the sets, reward model and results go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips, labels, reward model and DDPO")
    parser.add_argument("--prompts", type=int, default=len(PREFERENCE_PROMPTS), help="training prompts of the preference set")
    parser.add_argument("--clips-per-prompt", type=int, default=8, help="clips per prompt (all their pairs are labelled)")
    parser.add_argument("--agreement", type=float, default=0.85, help="expected agreement of the labels with the judge's ranking")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per clip")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--rm-epochs", type=int, default=60, help="reward model epochs")
    parser.add_argument("--rm-lr", type=float, default=3e-3, help="reward model learning rate")
    parser.add_argument("--epochs", type=int, default=15, help="DDPO epochs per kl_coef (4 prompts x 4 samples each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="DDPO learning rate")
    parser.add_argument("--reward-model", type=Path,
                        help="skip steps 1-2: run DDPO on this exported reward model (e.g. another run's OUT/reward_model)")
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.01, 0.1], help="kl_coef values, one DDPO run each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    print(f"backbone={args.backbone} seed={args.seed} duration={args.duration} steps={args.steps}")
    reward_dir = args.reward_model or args.out / "reward_model"
    if args.reward_model:
        train_set = held_out_set = rm = None
        print(f"reward model {reward_dir}: {json.loads((reward_dir / 'reward_model.json').read_text())['metrics']}")
    else:
        train_set, held_out_set, rm = reward_model_steps(args, start)
    results = []
    for kl_coef in args.kl_coefs:
        before, after, history = ddpo(args, reward_dir, kl_coef)
        results.append({"kl_coef": kl_coef, "history": history, **{f"{k}_before": v.tolist() for k, v in before.items()},
                        **{f"{k}_after": v.tolist() for k, v in after.items()}})
        print(f"kl_coef={kl_coef:g}: learned {change(before['learned'], after['learned'])}; judge {change(before['judge'], after['judge'])}; "
              f"held-out KL per step {after['kl']:.4g} [{time.monotonic() - start:.0f} s]")
        print("  per epoch (learned, judge, train KL): " + " ".join(f"({a:.3f}, {b:.4f}, {c:.3g})" for a, b, c in history))
    print_table(args, results)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "train_set": train_set, "held_out_set": held_out_set,
               "reward_model": rm, "ddpo": results, "seconds": time.monotonic() - start}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"total {time.monotonic() - start:.0f} s; results in {args.out / 'results.json'}")


def reward_model_steps(args: argparse.Namespace, start: float) -> tuple[dict, dict, dict]:
    """Steps 1-2: the preference sets and the reward model fitted on them (exported to OUT/reward_model)."""
    train_set, held_out_set = preference_sets(args, args.out)
    print(f"preference sets: train {train_set['pairs']} pairs ({train_set['prompts']} prompts x {args.clips_per_prompt} clips), "
          f"held-out {held_out_set['pairs']} pairs ({held_out_set['prompts']} other prompts); temperature {train_set['temperature']:.4g}; "
          f"labels agree with the judge's ranking: train {train_set['sampled_agreement']:.1%} (expected {train_set['expected_agreement']:.1%}), "
          f"held-out {held_out_set['sampled_agreement']:.1%} (expected {held_out_set['expected_agreement']:.1%}) [{time.monotonic() - start:.0f} s]")
    rm = fit_reward_model(args, args.out)
    ceiling = held_out_set["sampled_agreement"]
    print(f"reward model: held-out pair accuracy {rm['accuracy']:.1%} vs ceiling {ceiling:.1%} ({(rm['accuracy'] - ceiling) * 100:+.1f} points), "
          f"loss {rm['loss']:.3f}, calibration error {rm['calibration_error']:.3f}; training pairs accuracy {rm['train_accuracy']:.1%} "
          f"[{time.monotonic() - start:.0f} s]")
    return train_set, held_out_set, rm


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(f"\nDDPO {args.epochs} epochs, lr {args.lr}, held-out: {len(HELD_OUT_PROMPTS)} prompts x 4 samples, noise seed {10_000 + args.seed}")
    print("| kl_coef | learned reward gain | judge (centroid) gain | judge change | held-out KL per step |")
    print("|---:|---:|---:|---:|---:|")
    for row in results:
        learned_b, learned_a = torch.tensor(row["learned_before"]), torch.tensor(row["learned_after"])
        judge_b, judge_a = torch.tensor(row["judge_before"]), torch.tensor(row["judge_after"])
        print(f"| {row['kl_coef']:g} | {(learned_a.mean() - learned_b.mean()) / learned_b.std():+.2f} std | "
              f"{(judge_a.mean() - judge_b.mean()) / judge_b.std():+.2f} std | {(judge_a.mean() / judge_b.mean() - 1) * 100:+.1f} % | "
              f"{row['kl_after']:.4g} |")


if __name__ == "__main__":
    main()
