"""The cost of a Diffusion-DPO training step against the bare UNet passes it cannot avoid, side by side in one run.

(a) ``DiffusionDPOModule.dpo_terms`` + backward on one batch of pairs, caches warm (every clip's latents
    and every prompt's conditioning encoded once, as from the second epoch on): one reference UNet call
    (LoRA off, no gradient) and one policy call, each on the chosen and rejected latents together,
    the DPO loss, backward.
(b) the bare minimum on the same noised latents and conditioning: a UNet forward+backward (LoRA on,
    ``mean()`` as the loss) on the chosen latents, another on the rejected latents, and two
    no-gradient forwards with the LoRA off.

Repeats are interleaved and the medians compared; the target is (a) / (b) <= 1.10. The optimizer step,
the same in both, is left out. On a CUDA GPU the full-size audioldm2-music architecture (random
weights, float16 frozen, 16-mixed) is used with configs/dpo_audio_alpaca.yaml's batch of 2 pairs of
10 s clips; on a CPU the tiny preset.

    python benchmarks/dpo_speed.py                       # tiny on CPU, 4 pairs of 2 s clips
    python benchmarks/dpo_speed.py --backbone runs/tiny-trained --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import lora_strength
from rlmusic_pl.modules import DiffusionDPOModule
from rlmusic_pl.modules.slider import noised_pair
from rlmusic_pl.rewards import SpectralCentroidReward

sys.path.insert(0, str(Path(__file__).parent))
from ddpo_speed import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' or a diffusers directory (CPU); CUDA uses the full-size architecture")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per batch (default: 2 on CUDA, 4 on CPU)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per clip (default: 10 on CUDA, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each side (medians are compared)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    pairs, duration = args.pairs or (2 if cuda else 4), args.duration or (10.0 if cuda else 2.0)

    module = DiffusionDPOModule(SpectralCentroidReward(), backbone=args.backbone, lora_rank=8, lora_alpha=8.0, lora_targets="attention")
    if cuda:
        from full_size import full_size_pipeline

        module.backbone = AudioLDM2Backbone(full_size_pipeline(torch.float16))
        module.add_adapters(module.backbone.unet)
        autocast = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
        label = "full-size audioldm2-music architecture (random weights), float16 frozen, 16-mixed"
    else:
        autocast = contextlib.nullcontext
        label = f"{args.backbone} backbone, float32, 1 CPU thread"
    module.configure_model()
    module.to(device)
    backbone = module.backbone
    samples = backbone.num_samples(duration)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "prompt": [f"a recording of sound {i}" for i in range(pairs)],
        "chosen": [f"w{i}.wav" for i in range(pairs)], "rejected": [f"l{i}.wav" for i in range(pairs)],
        "chosen_audio": 0.1 * torch.randn(pairs, samples, generator=generator),
        "rejected_audio": 0.1 * torch.randn(pairs, samples, generator=generator),
        "tie": torch.zeros(pairs, dtype=torch.bool),
    }
    with autocast():
        module.dpo_terms(batch, torch.Generator().manual_seed(0))  # fills the caches
        chosen = module.clip_latents(batch["chosen"], batch["chosen_audio"])
        rejected = module.clip_latents(batch["rejected"], batch["rejected_audio"])
        text = module.prompt_texts(batch["prompt"])
    pair = noised_pair(backbone, chosen, rejected, torch.Generator().manual_seed(1))

    def dpo_step() -> None:
        with autocast():
            loss = module.dpo_terms(batch, torch.Generator().manual_seed(1)).loss
        loss.backward()

    def bare_passes() -> None:
        with autocast():
            for latents in (pair.positive, pair.negative):
                with torch.no_grad(), lora_strength(backbone.unet, 0.0):
                    backbone.unet_noise(latents, pair.timesteps, text)
                backbone.unet_noise(latents, pair.timesteps, text).float().mean().backward()

    dpo_step(), bare_passes()  # warm-up
    ours, bare = [], []
    for _ in range(args.repeats):
        ours.append(timed(dpo_step))
        bare.append(timed(bare_passes))
    ours_s, bare_s = statistics.median(ours), statistics.median(bare)
    print(f"# {label}; device {device}; {pairs} pairs of {duration} s clips, LoRA rank 8 on attention, {args.repeats} repeats")
    print(f"DPO step (loss + backward, caches warm) {ours_s * 1e3:.1f} ms   "
          f"bare 2 x UNet fwd+bwd + 2 x reference fwd {bare_s * 1e3:.1f} ms   ratio {ours_s / bare_s:.3f} (target <= 1.10)")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
