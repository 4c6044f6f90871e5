"""Does the Stage-1 slider move the *audio*? Spectral centroid against strength on held-out prompts and seeds.

Trains the brightness slider on the trained tiny backbone through the CLI, as a user would
(``configs/tiny/slider_trained.yaml``; skipped with ``--slider DIR``), then generates every held-out
prompt from every unseen noise seed at the strengths ``--strengths`` with deterministic DDIM (the
slider switched on after ``--start-fraction`` of the steps) and prints:

- the mean audio spectral centroid (fraction of Nyquist) per strength, and the same for the mel
  the vocoder rendered (``mel_centroid``), so a slider that moves the mel but not the audio shows;
- the mean centroid at the largest strength minus at the smallest, against the difference between
  the bright and the dull training sets' mean centroids and its half (the must-show bar);
- the fraction of (prompt, seed) pairs whose centroid rises strictly with the strength;
- the largest difference between the s = 0 clips and the base model's (the LoRA removed).

With ``--stage2 DIR`` it also sweeps [0, 1] on ``--grid`` strengths with the slider and with the
Stage-2 adapter and prints the audio centroid's linearity (R², largest neighbouring jump over the
range, range) for both, and the spread over rollouts of the mel-SSIM stability reward, absolute and
relative (``SpectralStabilityReward(relative=True)``), and each sweep's time against Stage 1's (a clip-aware
schedule first generates its pilot strengths). ``--schedule COND:THETA ...`` adds hand-set
gain schedules shared by all layers (e.g. ``interior:0.2,0.2``, multiplier ``1 + (1 - s)(0.2 + 0.2 s)``),
to see what Stage 2 could gain on a slider before running PPO.

    python benchmarks/train_tiny_backbone.py runs/tiny-trained
    python benchmarks/slider_audio.py --backbone runs/tiny-trained
    python -m rlmusic_pl fit --config configs/tiny/scale_ppo_trained.yaml
    python benchmarks/slider_audio.py --slider checkpoints/tiny_slider_trained --stage2 checkpoints/tiny_scale_ppo_trained
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.data.synthetic import NEGATIVE, POSITIVE
from rlmusic_pl.gain_schedule import CLIP_CONDITIONINGS, FEATURES, attach_fixed_schedule, load_gain_schedule
from rlmusic_pl.lora import load_lora
from rlmusic_pl.modules.slider import generate_with_schedule, loaded_schedule_attribute
from rlmusic_pl.rewards.stability import SpectralStabilityReward, StrengthSweep, linearity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brightness_chain import audio_centroid, contrast_audio, mel_centroid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_PROMPTS = ["a soft flute", "a loud trumpet", "a sad cello", "a tender harp"]


def train_slider(args: argparse.Namespace) -> str:
    """Fit the slider config through the CLI; returns the exported adapter directory."""
    command = [
        sys.executable, "-m", "rlmusic_pl", "fit", "--config", args.config, f"--model.backbone={args.backbone}",
        f"--model.export_to={args.export_to}", f"--trainer.default_root_dir={args.root_dir}", "--trainer.enable_progress_bar=false",
        *args.fit_args,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return args.export_to


@torch.no_grad()
def sweep(backbone: AudioLDM2Backbone, strengths: list[float], args: argparse.Namespace, steering: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Audio centroids, mel centroids [S, seeds * prompts] and waveforms [S, seeds * prompts, T] at every strength
    (``steering``: the gain schedule's arguments of ``generate_with_schedule``)."""
    cond = backbone.encode_prompts(args.prompts)
    audio, mel, waves = [], [], []
    for seed in args.seeds:
        noise = backbone.initial_latents(len(args.prompts), args.duration_s, torch.Generator().manual_seed(seed))
        latents = generate_with_schedule(backbone, cond, noise, strengths, args.num_steps, args.guidance_scale, args.start_fraction, **(steering or {}))
        mels = backbone.latents_to_mel(latents)
        wave = backbone.mel_to_waveform(mels, args.duration_s)
        audio.append(audio_centroid(wave).view(len(strengths), -1))
        mel.append(mel_centroid(mels).view(len(strengths), -1))
        waves.append(wave.view(len(strengths), len(args.prompts), -1))
    return torch.cat(audio, 1), torch.cat(mel, 1), torch.cat(waves, 1)


def load(args: argparse.Namespace, adapter: str | None) -> tuple[AudioLDM2Backbone, dict]:
    """The backbone with ``adapter`` (None: the base model) and the arguments that generate with its gain schedule."""
    backbone = AudioLDM2Backbone.load(args.backbone)
    if adapter is None:
        return backbone, {}
    load_lora(backbone.unet, adapter)
    schedule = load_gain_schedule(backbone.unet, adapter)  # None (nothing loaded) for a Stage-1 slider
    return backbone, {"schedule": schedule, "attribute_of": loaded_schedule_attribute(schedule, backbone, args.duration_s, adapter)}


def report_slider(args: argparse.Namespace, slider: str) -> dict[str, float]:
    strengths = sorted(args.strengths)
    audio, mel, waves = sweep(load(args, slider)[0], strengths, args)
    _, _, base = sweep(load(args, None)[0], [0.0], args)
    sets = contrast_audio(args.sets, args.count, args.duration_sets)
    train_diff = (audio_centroid(sets[POSITIVE]).mean() - audio_centroid(sets[NEGATIVE]).mean()).item()
    print(f"{len(args.prompts)} held-out prompts x seeds {args.seeds}, {args.num_steps} DDIM steps, guidance {args.guidance_scale}, "
          f"start_fraction {args.start_fraction}; centroids as fractions of Nyquist")
    print(f"{'strength':>8s} {'audio centroid':>14s} {'(std)':>7s} {'mel centroid':>12s}")
    for s, a, m in zip(strengths, audio, mel):
        print(f"{s:8.2f} {a.mean():14.4f} {a.std():7.4f} {m.mean():12.4f}")
    moved = (audio[-1].mean() - audio[0].mean()).item()
    monotone = (audio.diff(dim=0) > 0).all(0).float().mean().item()
    zero = strengths.index(0.0) if 0.0 in strengths else None
    base_diff = (waves[zero] - base[0]).abs().max().item() if zero is not None else float("nan")
    print(f"audio centroid at s={strengths[-1]:+g} minus s={strengths[0]:+g}: {moved:+.4f}; mel centroid: {(mel[-1].mean() - mel[0].mean()).item():+.4f}")
    print(f"bright - dull training sets (audio): {train_diff:+.4f}, half: {train_diff / 2:+.4f} -> {'MET' if moved >= train_diff / 2 else 'not met'}")
    print(f"monotone in strength: {monotone:.0%} of {audio.shape[1]} prompt-seed pairs -> {'MET' if monotone >= 0.9 else 'not met'}")
    print(f"s = 0 vs the base model: largest waveform difference {base_diff:.2e}")
    return {"moved": moved, "train_diff": train_diff, "monotone": monotone, "base_diff": base_diff}


def hand_set_schedule(args: argparse.Namespace, slider: str, conditioning: str, theta: list[float]) -> tuple[AudioLDM2Backbone, dict]:
    """The slider with a shared gain schedule of ``conditioning`` and coefficients ``theta`` (``GainSchedule(shared=True)``)."""
    backbone, _ = load(args, slider)
    schedule = attach_fixed_schedule(backbone.unet, torch.tensor(theta), conditioning=conditioning, shared=True,
                                     num_train_timesteps=backbone.scheduler.config.num_train_timesteps)
    return backbone, {"schedule": schedule}


def report_linearity(args: argparse.Namespace, slider: str) -> None:
    strengths = torch.linspace(0, 1, args.grid)
    print(f"audio centroid against strength on [0, 1] ({args.grid} strengths), means over (prompt, seed)")
    print(f"and the stability reward (sigma {args.sigma}) per rollout, mean (std): absolute and relative to the rollout's own SSIM drop")
    print("and the sweep's generation and decoding time, seconds and relative to Stage 1's (one after the other, this process)")
    print(f"{'':24s} {'R2':>7s} {'max jump':>9s} {'range':>7s} {'absolute':>16s} {'relative':>16s} {'seconds':>8s} {'ratio':>6s}"
          f"   (even rise: R2 1, max jump {1 / (args.grid - 1):.3f})")
    rewards = {kind: SpectralStabilityReward(sigma=args.sigma, relative=kind == "relative") for kind in ("absolute", "relative")}
    variants = {"Stage 1": lambda: load(args, slider)}
    if args.stage2:
        variants["Stage 2"] = lambda: load(args, args.stage2)
    for conditioning, theta in args.schedule:
        variants[f"{conditioning}:{','.join(f'{x:g}' for x in theta)}"] = lambda c=conditioning, th=theta: hand_set_schedule(args, slider, c, th)
    stage1_seconds = None
    for name, build in variants.items():
        backbone, steering = build()
        start = time.perf_counter()
        audio, _, waves = sweep(backbone, strengths.tolist(), args, steering)
        seconds = time.perf_counter() - start
        stage1_seconds = stage1_seconds or seconds
        r2, max_jump = linearity(audio, strengths)
        stability = {kind: reward.evaluate(StrengthSweep(waves, strengths, backbone.sample_rate)).total for kind, reward in rewards.items()}
        spreads = "".join(f" {v.mean():8.4f} ({v.std():.4f})" for v in stability.values())
        print(f"{name:24s} {r2.mean():7.4f} {max_jump.mean():9.4f} {(audio[-1] - audio[0]).mean():7.4f}{spreads} {seconds:8.1f} {seconds / stage1_seconds:6.2f}",
              flush=True)


def schedule_spec(text: str) -> tuple[str, list[float]]:
    """``CONDITIONING:THETA,...`` (e.g. ``interior:0.2,0.2``) -> (conditioning, coefficients), checked."""
    conditioning, _, numbers = text.partition(":")
    if conditioning not in FEATURES or conditioning in CLIP_CONDITIONINGS:
        raise argparse.ArgumentTypeError(f"{text!r}: the conditioning must be one of {sorted(set(FEATURES) - set(CLIP_CONDITIONINGS))}")
    try:
        theta = [float(x) for x in numbers.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers after the colon, e.g. interior:0.2,0.2") from None
    if len(theta) != FEATURES[conditioning]:
        raise argparse.ArgumentTypeError(f"{text!r}: {conditioning} takes {FEATURES[conditioning]} coefficients, got {len(theta)}")
    return conditioning, theta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="runs/tiny-trained", help="the trained tiny pipeline (benchmarks/train_tiny_backbone.py)")
    parser.add_argument("--slider", default=None, help="an already trained slider adapter: skip training")
    parser.add_argument("--config", default="configs/tiny/slider_trained.yaml", help="the slider's fit config")
    parser.add_argument("--export-to", default="checkpoints/tiny_slider_trained", help="where the trained slider is exported")
    parser.add_argument("--root-dir", default="runs/tiny_slider_trained", help="the slider run's default_root_dir")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="further CLI overrides of the fit (last)")
    parser.add_argument("--stage2", default=None, help="a Stage-2 adapter on top of the slider: also report linearity")
    parser.add_argument("--prompts", nargs="+", default=HELD_OUT_PROMPTS, help="held-out prompts (not the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[101, 102, 103], help="noise seeds training never draws")
    parser.add_argument("--strengths", nargs="+", type=float, default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    parser.add_argument("--schedule", nargs="+", type=schedule_spec, default=[], metavar="COND:THETA",
                        help="hand-set gain schedules shared by all layers on the slider, e.g. interior:0.2,0.2 "
                             "(1 + (1 - s)(0.2 + 0.2 s)) or strength_step:0,0,-1,0: their linearity too")
    parser.add_argument("--grid", type=int, default=9, help="strengths from 0 to 1 for the linearity (with --stage2 or --schedule)")
    parser.add_argument("--sigma", type=float, default=0.2, help="tolerance of the stability rewards reported with --stage2")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--start-fraction", type=float, default=0.0, help="fraction of the steps run before the slider is switched on")
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--sets", default="runs/synthetic/brightness_trained", help="the slider's contrast sets (the config's directory)")
    parser.add_argument("--count", type=int, default=16, help="clips per side in --sets")
    parser.add_argument("--duration-sets", type=float, default=2.0, help="seconds per clip in --sets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    slider = args.slider or train_slider(args)
    report_slider(args, slider)
    if args.stage2 or args.schedule:
        report_linearity(args, slider)


if __name__ == "__main__":
    main()
