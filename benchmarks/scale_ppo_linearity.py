"""Stage 2 benchmark: how linearly the Stage-1 attribute follows the strength, before and after Stage 2.

For held-out prompts and noise seeds (not those of training), every (prompt, seed) is generated
from one fixed noise at a grid of strengths in [0, 1] with deterministic DDIM, once with the
Stage-1 slider and once with the Stage-2 adapter (same LoRA plus its gain schedule). Reported, as
means over (prompt, seed):

- ``r2``: R² of the attribute (the slider's ``AttributeProbe`` score) against the strength (1 = a line);
- ``max_jump``: the largest step between neighbouring strengths over the full range |a(1) - a(0)|
  (1 / (G - 1) for an even rise);
- ``range``: a(1) - a(0), so that a weaker slider is visible;
- ``stability``: the spectral-temporal stability reward (mel SSIM to strength 0 against the target curve).

    python -m rlmusic_pl fit --config configs/tiny/slider_stage1.yaml
    python -m rlmusic_pl fit --config configs/tiny/scale_ppo_stage2.yaml
    python benchmarks/scale_ppo_linearity.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import load_lora, read_adapter_info
from rlmusic_pl.gain_schedule import load_gain_schedule
from rlmusic_pl.modules.slider import attribute_probe_from, generate_with_schedule, loaded_schedule_attribute
from rlmusic_pl.rewards.stability import SpectralStabilityReward, StrengthSweep, linearity

HELD_OUT_PROMPTS = ["A violin sonata", "Electronic dance music with a heavy beat", "A calm acoustic guitar", "A brass band march"]


def measure(adapter: str, probe_source: str, args: argparse.Namespace) -> dict[str, float]:
    backbone = AudioLDM2Backbone.load(args.backbone)
    load_lora(backbone.unet, adapter)
    schedule = load_gain_schedule(backbone.unet, adapter)  # None for the Stage-1 slider
    attribute_of = loaded_schedule_attribute(schedule, backbone, args.duration_s, adapter)
    probe = attribute_probe_from(read_adapter_info(probe_source))
    strengths = torch.linspace(0, 1, args.grid)
    stability = SpectralStabilityReward(beta=args.beta)
    rows: dict[str, list[torch.Tensor]] = {"r2": [], "max_jump": [], "range": [], "stability": []}
    for seed in args.seeds:
        cond = backbone.encode_prompts(args.prompts)
        noise = backbone.initial_latents(len(args.prompts), args.duration_s, torch.Generator().manual_seed(seed))
        latents = generate_with_schedule(backbone, cond, noise, strengths.tolist(), args.num_steps, args.guidance_scale,
                                         schedule=schedule, attribute_of=attribute_of)
        attribute = probe.score(latents).view(args.grid, -1)
        r2, max_jump = linearity(attribute, strengths)
        waves = backbone.decode(latents, args.duration_s).float().view(args.grid, len(args.prompts), -1)
        rows["r2"].append(r2)
        rows["max_jump"].append(max_jump)
        rows["range"].append(attribute[-1] - attribute[0])
        rows["stability"].append(stability.evaluate(StrengthSweep(waves, strengths, backbone.sample_rate)).total)
    return {name: torch.cat(values).mean().item() for name, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slider", default="checkpoints/tiny_slider_stage1", help="the Stage-1 slider")
    parser.add_argument("--stage2", default="checkpoints/tiny_scale_ppo_stage2", help="the Stage-2 adapter")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--prompts", nargs="+", default=HELD_OUT_PROMPTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[101, 102, 103])
    parser.add_argument("--grid", type=int, default=9, help="evenly spaced strengths from 0 to 1")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{len(args.prompts)} held-out prompts x seeds {args.seeds}, strengths: {args.grid} from 0 to 1, {args.num_steps} DDIM steps")
    print(f"{'':8s} {'R2':>7s} {'max jump':>9s} {'range':>7s} {'stability':>9s}   (even rise: R2 1, max jump {1 / (args.grid - 1):.3f})")
    for name, adapter in (("Stage 1", args.slider), ("Stage 2", args.stage2)):
        m = measure(adapter, args.slider, args)
        print(f"{name:8s} {m['r2']:7.4f} {m['max_jump']:9.4f} {m['range']:7.3f} {m['stability']:9.4f}")


if __name__ == "__main__":
    main()
