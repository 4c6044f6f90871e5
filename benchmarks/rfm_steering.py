"""MusicRFM on a trained tiny MusicGen: probe scores per layer (RFM against the linear baseline), steering toward a
pitch class, and a regression direction (brightness) steered both ways.

1. Concept data at the model's own rate and length (``synthesize --concept``): ``notes`` (12 pitch
   classes x ``--octaves`` x bright/dull) and ``brightness`` (held notes whose harmonic roll-off goes
   from the dull timbre to the bright one, a continuous label). ``SteeringModule.fit`` (through a
   Lightning ``Trainer``, as ``python -m rlmusic_pl fit`` runs it) collects every decoder layer's
   mean-pooled output on the clips' codes and fits, per layer, an RFM probe (random search) and the
   linear baseline on a stratified split (``--split-seed``): validation ROC AUC per class (notes) or
   R^2 (brightness).
2. Steering toward ``--target`` on held-out prompts: every "a {bright,dull} X note" whose X is not the
   target (the model's own prompt format, never naming the target), plus neutral prompts that name
   no pitch class, with seeds ``--seed``.. that neither the probes nor the training saw. Every
   coefficient of a (prompt, seed) is sampled from the same random draws, so coefficient 0 is the
   unsteered model. Reported per coefficient: the target's share among the clips (strongest
   pitch class of the decoded audio, ``estimate_pitch_class``, as ``PitchClassReward(hard=True)``),
   and the text adherence: the share whose strongest pitch class is the one the prompt names
   (the trained model's own conditioning accuracy).
3. The brightness direction steered at negative and positive coefficients on the same held-out prompts:
   the mean spectral centroid of the decoded audio, in harmonics (Hz over the prompt's fundamental in
   the octaves the model was trained on, so that a change of pitch does not pass for one of
   brightness), and in Hz; and the text adherence beside it.

    python benchmarks/train_tiny_musicgen.py runs/tiny-musicgen-trained       # the model (about 15 min)
    python benchmarks/rfm_steering.py runs/tiny-musicgen-trained --out runs/rfm_steering
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from lightning import Trainer
from torch import Tensor

from rlmusic_pl.callbacks.sweep_clips import Clip
from rlmusic_pl.data.concept_sets import write_concept_set
from rlmusic_pl.data.concepts import ConceptDataModule
from rlmusic_pl.data.synthetic import NEGATIVE, PITCH_CLASSES, POSITIVE, pitch_class_index
from rlmusic_pl.modules.steering import SteeringModule
from rlmusic_pl.rewards.pitch import estimate_pitch_class
from rlmusic_pl.rewards.simple import SpectralCentroidReward
from rlmusic_pl.steering.directions import ConceptDirections

NEUTRAL_PROMPTS = ("a bright note", "a dull note", "a note")


def learn(backbone: str, folder: Path, label: str, task: str, root: Path, args: argparse.Namespace) -> dict[str, ConceptDirections]:
    """Fit the RFM and linear probes on a concept folder; the direction files of both methods."""
    data = ConceptDataModule(str(folder), label=label, backbone=backbone, batch_size=16, progress=False)
    module = SteeringModule(task=task, compare_linear=True, backbone=backbone, search_trials=args.search_trials,
                            rfm_iters=args.rfm_iters, split_seed=args.split_seed, probe_val_fraction=args.val_fraction)
    Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=root, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    return {"rfm": ConceptDirections.load(root / "directions"), "linear": ConceptDirections.load(root / "directions_linear")}


def score_table(directions: dict[str, ConceptDirections], concept: str | None) -> list[str]:
    """Markdown rows: per layer, each method's validation score (mean over classes, and the ``concept``'s)."""
    rows = []
    for index, layer in enumerate(directions["rfm"].layers):
        cells = []
        for method in ("rfm", "linear"):
            scores = directions[method].scores[:, index]
            cells.append(f"{scores.mean():.3f}")
            if concept is not None:
                cells.append(f"{directions[method].layer_scores(concept)[index]:.3f}")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return rows


def steered_audio(backbone: str, directions: Path, concept: str, prompts: list[str], seeds: list[int], coefficients: list[float],
                  args: argparse.Namespace, module: SteeringModule | None = None) -> tuple[Tensor, SteeringModule]:
    """Decoded clips [len(seeds), len(prompts), len(coefficients), T], through ``SteeringModule.generate`` (a sweep's own path)."""
    module = module or SteeringModule(backbone=backbone, duration_s=args.duration, guidance_scale=args.guidance_scale, top_k=0,
                                      temperature=1.0, layer_mode=args.layer_mode,
                                      top_k_layers=args.top_k_layers, directions=str(directions), concept=concept)
    module.hparams.directions, module.hparams.concept = str(directions), concept
    module.steering_directions = ConceptDirections.load(directions)
    module.configure_model()
    waves = []
    for seed in seeds:
        clips = [Clip(item, prompt, "", {}, seed, 0.0) for item, prompt in enumerate(prompts)]
        waves.append(module.generate(clips, coefficients).view(len(prompts), len(coefficients), -1))
    return torch.stack(waves), module


def named_class(prompt: str) -> int | None:
    """The pitch class a prompt "a {brightness} X note" names, or None."""
    words = prompt.split()
    return pitch_class_index(words[2]) if len(words) == 4 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="the trained tiny MusicGen directory (or 'tiny' for a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("runs/rfm_steering"), help="concept sets, direction files, results.json")
    parser.add_argument("--target", default="E", help="the pitch class to steer toward")
    parser.add_argument("--coefficients", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    parser.add_argument("--brightness-coefficients", type=float, nargs="+", default=[-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt (--seed, --seed + 1, ...)")
    parser.add_argument("--seed", type=int, default=5000, help="the first sampling seed (unseen by training and probes)")
    parser.add_argument("--octaves", type=int, nargs="+", default=[2, 3, 4, 5], help="octaves of the notes concept set")
    parser.add_argument("--brightness-clips", type=int, default=96, help="clips of the brightness concept set")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per concept clip and per generated clip")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--layer-mode", default="all", help="SteeringModule layer_mode: all, top_k or exp_weighting")
    parser.add_argument("--top-k-layers", type=int, default=1, help="layers steered under --layer-mode top_k")
    parser.add_argument("--search-trials", type=int, default=8, help="RFM hyperparameter trials per layer and class")
    parser.add_argument("--rfm-iters", type=int, default=30)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the probes' train/validation split and search")
    parser.add_argument("--prompts", type=int, default=0, help="use only the first N held-out prompts (0: all; a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    started = time.monotonic()
    target = PITCH_CLASSES[pitch_class_index(args.target)]

    from rlmusic_pl.backbone.musicgen import MusicGenBackbone
    sample_rate = MusicGenBackbone.load(args.backbone).sample_rate
    notes, brightness = args.out / "concepts" / "notes", args.out / "concepts" / "brightness"
    write_concept_set(notes, "notes", args.duration, octaves=tuple(args.octaves), sample_rate=sample_rate)
    write_concept_set(brightness, "brightness", args.duration, count=args.brightness_clips, octaves=(3, 4), seed=args.split_seed,
                      sample_rate=sample_rate)
    note_dirs = learn(args.backbone, notes, "pitch_class", "multiclass", args.out / "fit_notes", args)
    bright_dirs = learn(args.backbone, brightness, "brightness", "regression", args.out / "fit_brightness", args)
    print(f"probes fit ({time.monotonic() - started:.0f} s)")
    print(f"\nvalidation ROC AUC per layer, notes (mean over the 12 classes | {target}):")
    print("| layer | RFM mean | RFM " + target + " | linear mean | linear " + target + " |\n|---|---:|---:|---:|---:|")
    print("\n".join(score_table(note_dirs, target)))
    print("\nvalidation R^2 per layer, brightness:\n| layer | RFM | linear |\n|---|---:|---:|")
    print("\n".join(score_table(bright_dirs, None)))

    held_out = [f"a {side} {name} note" for name in PITCH_CLASSES if name != target for side in (POSITIVE, NEGATIVE)]
    held_out = held_out[: args.prompts] if args.prompts else held_out
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "probe_scores": {name: {m: d.scores.tolist() for m, d in dirs.items()} for name, dirs in
                                (("notes", note_dirs), ("brightness", bright_dirs))}}
    module = None
    for method in ("rfm", "linear"):
        prompts = held_out + list(NEUTRAL_PROMPTS)
        audio, module = steered_audio(args.backbone, args.out / f"fit_notes/directions{'' if method == 'rfm' else '_linear'}", target,
                                      prompts, seeds, args.coefficients, args, module)
        classes = estimate_pitch_class(audio.flatten(0, 2), sample_rate).view(audio.shape[:3])  # [seeds, prompts, coefficients]
        named = torch.tensor([named_class(p) for p in held_out])
        rows = []
        for index, coefficient in enumerate(args.coefficients):
            on_held = classes[:, : len(held_out), index]
            rows.append({"coefficient": coefficient, "target_share": (on_held == pitch_class_index(target)).float().mean().item(),
                         "adherence": (on_held == named).float().mean().item(),
                         "target_share_neutral": (classes[:, len(held_out):, index] == pitch_class_index(target)).float().mean().item()})
        results[f"steer_{method}"] = rows
        print(f"\nsteering toward {target} with the {method} direction ({len(held_out)} held-out prompts x {len(seeds)} seeds; "
              f"neutral: {len(NEUTRAL_PROMPTS)} x {len(seeds)}):")
        print(f"| coefficient | {target} share (held-out) | text adherence | {target} share (neutral) |\n|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['coefficient']:g} | {row['target_share']:.3f} | {row['adherence']:.3f} | {row['target_share_neutral']:.3f} |")

    audio, module = steered_audio(args.backbone, args.out / "fit_brightness/directions", "brightness", held_out, seeds,
                                  args.brightness_coefficients, args, module)
    centroid = SpectralCentroidReward(normalize=False)
    hz = centroid(audio.flatten(0, 2), sample_rate, [""] * audio[..., 0].numel(), [{}] * audio[..., 0].numel()).view(audio.shape[:3])
    classes = estimate_pitch_class(audio.flatten(0, 2), sample_rate).view(audio.shape[:3])
    named = torch.tensor([named_class(p) for p in held_out])
    # The fundamental of the prompt's class in octave 3.5 (the trained octaves' middle): Hz -> harmonics without the pitch.
    fundamental = 440.0 * 2 ** ((named.float() + 12 * 4.5 - 69) / 12)
    rows = []
    for index, coefficient in enumerate(args.brightness_coefficients):
        rows.append({"coefficient": coefficient, "centroid_hz": hz[..., index].mean().item(),
                     "centroid_harmonics": (hz[..., index] / fundamental).mean().item(),
                     "adherence": (classes[..., index] == named).float().mean().item()})
    results["steer_brightness"] = rows
    print(f"\nsteering along the brightness (regression) direction ({len(held_out)} held-out prompts x {len(seeds)} seeds):")
    print("| coefficient | spectral centroid (Hz) | centroid / fundamental | text adherence |\n|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['coefficient']:g} | {row['centroid_hz']:.0f} | {row['centroid_harmonics']:.2f} | {row['adherence']:.3f} |")
    results["seconds"] = time.monotonic() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['seconds']:.0f} s; wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
