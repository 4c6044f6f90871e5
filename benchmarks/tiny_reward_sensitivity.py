"""How much can a policy move each cheap reward on the tiny backbone? (Why DDPO shows no learning there.)

For one batch of samples (fixed prompts and noise) it prints, per reward, the spread between samples
and the shift of the batch mean, in units of that spread, when (a) the final latents are replaced by
fresh unit noise and (b) the LoRA's B weights are drawn at random (N(0, scale)), i.e. the policy
changes a lot. A reward that (b) barely moves gives DDPO almost nothing to climb.

    python benchmarks/tiny_reward_sensitivity.py
"""

from __future__ import annotations

import argparse
import os

import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import LoRASettings, add_lora
from rlmusic_pl.rewards import BandEnergyReward, LoudnessReward, SpectralCentroidReward, SpectralFluxReward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random weights) or a directory, e.g. from benchmarks/train_tiny_backbone.py")
    parser.add_argument("--batch", type=int, default=8, help="samples in the batch")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per sample")
    parser.add_argument("--steps", type=int, default=6, help="DDIM steps")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.2], help="std of the random LoRA B weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    backbone = AudioLDM2Backbone.load(args.backbone)
    add_lora(backbone.unet, LoRASettings(rank=8, alpha=8.0, targets="attention+conv", init_seed=0))
    rewards = [LoudnessReward(), SpectralCentroidReward(), BandEnergyReward(0.0, 500.0, name="low_band"), SpectralFluxReward()]
    cond = backbone.encode_prompts(["a soft flute"] * args.batch, ["noise"] * args.batch)
    noise = backbone.initial_latents(args.batch, args.duration, torch.Generator().manual_seed(0))

    def final_latents() -> torch.Tensor:
        return backbone.sample(cond, noise, args.steps, 3.5, 1.0, torch.Generator().manual_seed(1)).final

    @torch.no_grad()
    def scores(latents: torch.Tensor) -> torch.Tensor:
        waves = backbone.decode(latents, args.duration)
        return torch.stack([r(waves, backbone.sample_rate, ["x"] * args.batch, [{}] * args.batch) for r in rewards])

    latents = final_latents()
    base = scores(latents)
    spread = base.std(1)
    print(f"final latents: std {latents.std():.2f} (a trained model's are ~1)")
    rows = [("fresh unit-noise latents", scores(torch.randn_like(latents)))]
    for scale in args.scales:
        for draw in range(2):
            generator = torch.Generator().manual_seed(draw)
            for name, param in backbone.unet.named_parameters():
                if ".lora_B." in name:
                    param.data = scale * torch.randn(param.shape, generator=generator)
            rows.append((f"random LoRA B ~ N(0, {scale}), draw {draw}", scores(final_latents())))
    print(f"{'change':42s}" + "".join(f"{r.name:>18s}" for r in rewards))
    print(f"{'spread between samples (std)':42s}" + "".join(f"{v:18.4g}" for v in spread.tolist()))
    for label, values in rows:
        shift = (values.mean(1) - base.mean(1)) / spread
        print(f"{label:42s}" + "".join(f"{v:+17.2f}s" for v in shift.tolist()))


if __name__ == "__main__":
    main()
