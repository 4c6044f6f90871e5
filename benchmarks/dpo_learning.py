"""Does Diffusion-DPO learn a hidden judge from its preference labels, and how does it compare with DDPO per judge call?

1. Pairs: the base backbone generates ``--clips-per-prompt`` clips of each training prompt; a hidden judge
   (the spectral centroid, i.e. brightness) scores them and every pair of a prompt's clips is labelled
   by a noisy Bradley-Terry rater (``make_preference_set``, ``--agreement`` 0.85). The judge is called
   once per clip: judge calls = prompts x clips per prompt.
2. DPO: ``DiffusionDPOModule`` trains on those pairs alone for ``--dpo-steps`` steps; it never sees the judge.
3. DDPO: ``DDPOModule`` optimises the judge itself as its reward (configs/tiny/ddpo_learning.yaml's
   settings) for as many epochs as the same number of judge calls allows (each epoch scores its
   ``4 prompts x --ddpo-samples`` samples).
4. Both are measured by the judge on held-out prompts with held-out noise (the same fixed batch before
   and after), in held-out standard deviations, and per judge call.

On the random tiny preset the judge barely moves; use the tiny architecture trained on synthetic notes:

    python benchmarks/train_tiny_backbone.py runs/tiny-trained
    python benchmarks/dpo_learning.py --backbone runs/tiny-trained --clips-per-prompt 16 --dpo-steps 200 --seed 0
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning import Trainer, seed_everything

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.data import PreferencePairs, PromptAttributeDataModule
from rlmusic_pl.modules import DDPOModule, DiffusionDPOModule
from rlmusic_pl.preference_sets import ClipGenerator, make_preference_set
from rlmusic_pl.rewards import SpectralCentroidReward

TRAIN_PROMPTS = ["a bright piano", "a calm guitar", "an angry drum", "a happy violin",
                 "a gentle organ", "a dark bass", "a quick marimba", "a warm choir"]
HELD_OUT_PROMPTS = ["a soft flute", "a loud trumpet", "a sad cello", "a tender harp"]
LORA = dict(lora_rank=8, lora_alpha=8.0, lora_targets="attention+conv")


@torch.no_grad()
def judge_score(backbone: AudioLDM2Backbone, judge, args: argparse.Namespace) -> torch.Tensor:
    """The judge's scores [held-out prompts x samples] of clips from fixed noise (seed 10_000 + seed)."""
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(args.held_out_samples)]
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    cond = backbone.encode_prompts(prompts, ["noise"] * len(prompts))
    result = backbone.sample(cond, backbone.initial_latents(len(prompts), args.duration, generator), args.steps, args.guidance, 1.0, generator)
    waveforms = backbone.decode(result.final, args.duration)
    return judge.evaluate(waveforms, backbone.sample_rate, prompts, [{}] * len(prompts)).total


def trainer(run_dir: str, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run_dir, **kwargs)


def run_dpo(pairs: Path, args: argparse.Namespace, work: str) -> DiffusionDPOModule:
    # The reward only scores validation clips, and no validation runs here: DPO sees the judge's labels alone.
    module = DiffusionDPOModule(SpectralCentroidReward(), backbone=args.backbone, beta=args.beta, learning_rate=args.dpo_lr,
                                duration_s=args.duration, seed=args.seed, **LORA)
    data = PromptAttributeDataModule(preferences=PreferencePairs(str(pairs), duration_s=args.duration), batch_size=args.dpo_batch,
                                     negative_prompt="noise", seed=args.seed)
    trainer(work, max_steps=args.dpo_steps, max_epochs=-1).fit(module, data)
    return module


def run_ddpo(epochs: int, args: argparse.Namespace, work: str) -> DDPOModule:
    # configs/tiny/ddpo_learning.yaml's settings, with the judge as the reward.
    module = DDPOModule(SpectralCentroidReward(), backbone=args.backbone, duration_s=args.duration, num_steps=args.steps,
                        guidance_scale=args.guidance, eta=1.0, samples_per_prompt=args.ddpo_samples, sample_batch_size=16,
                        train_batch_size=16, inner_epochs=2, clip_range=0.2, stat_min_count=8, learning_rate=1e-3, seed=args.seed, **LORA)
    data = PromptAttributeDataModule(prompts=TRAIN_PROMPTS, negative_prompt="noise", batch_size=4, seed=args.seed)
    trainer(work, max_epochs=epochs).fit(module, data)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random weights) or a directory, e.g. runs/tiny-trained")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs, of both trainings and of the held-out noise")
    parser.add_argument("--clips-per-prompt", type=int, default=16, help="clips judged per training prompt (8 prompts)")
    parser.add_argument("--agreement", type=float, default=0.85, help="how often the rater's labels agree with the judge's ranking")
    parser.add_argument("--dpo-steps", type=int, default=200, help="DPO optimizer steps")
    parser.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step")
    parser.add_argument("--dpo-lr", type=float, default=1e-3, help="DPO AdamW learning rate")
    parser.add_argument("--beta", type=float, default=2000.0, help="DPO beta")
    parser.add_argument("--ddpo-samples", type=int, default=4, help="DDPO samples per prompt per epoch (4 prompts per epoch)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per clip")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of every generation")
    parser.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale of every generation")
    parser.add_argument("--held-out-samples", type=int, default=8, help="held-out clips per held-out prompt")
    parser.add_argument("--skip-ddpo", action="store_true", help="run DPO only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed_everything(args.seed)
    judge = SpectralCentroidReward()
    judge_calls = len(TRAIN_PROMPTS) * args.clips_per_prompt
    rows = []
    with tempfile.TemporaryDirectory() as work:
        start = time.monotonic()
        clips = ClipGenerator("audioldm2", args.backbone, duration_s=args.duration, num_steps=args.steps, guidance_scale=args.guidance, batch_size=16)
        before = judge_score(clips.backbone, judge, args)
        items = [{"prompt": p, "negative_prompt": "noise", "attributes": {}} for p in TRAIN_PROMPTS]
        summary = make_preference_set(Path(work) / "pairs", items, clips, judge, args.clips_per_prompt, agreement=args.agreement, seed=args.seed)
        print(f"pairs: {summary['pairs']} from {judge_calls} judge calls, labels agree with the judge {summary['sampled_agreement']:.1%}")
        dpo = run_dpo(Path(work) / "pairs" / "pairs.jsonl", args, work)
        rows.append(("Diffusion-DPO", judge_calls, judge_score(dpo.backbone, judge, args), time.monotonic() - start))
        if not args.skip_ddpo:
            start = time.monotonic()
            epochs = max(1, judge_calls // (4 * args.ddpo_samples))
            ddpo = run_ddpo(epochs, args, work)
            rows.append((f"DDPO ({epochs} epochs)", epochs * 4 * args.ddpo_samples, judge_score(ddpo.backbone, judge, args), time.monotonic() - start))
    print(f"backbone={args.backbone} seed={args.seed} clips_per_prompt={args.clips_per_prompt} agreement={args.agreement} "
          f"dpo_steps={args.dpo_steps} dpo_batch={args.dpo_batch} dpo_lr={args.dpo_lr} beta={args.beta} ddpo_samples={args.ddpo_samples}")
    print(f"held-out judge (spectral centroid) before: mean {before.mean():.4f}, std {before.std():.4f}, n={before.numel()} "
          f"({len(HELD_OUT_PROMPTS)} held-out prompts, noise seed {10_000 + args.seed})")
    print("| method | judge calls | held-out judge after | change (held-out std) | change per 100 judge calls (std) | wall s |")
    print("|---|---|---|---|---|---|")
    for name, calls, after, seconds in rows:
        gain = ((after.mean() - before.mean()) / before.std()).item()
        print(f"| {name} | {calls} | {after.mean():.4f} | {gain:+.2f} | {100 * gain / calls:+.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
