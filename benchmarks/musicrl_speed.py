"""The cost of a MusicRL training step against the bare decoder passes it cannot avoid, side by side in one run.

(a) ``MusicRLModule.loss_terms`` + backward on one minibatch: the policy's teacher-forced pass (guided,
    with distributions and hidden states), the reference pass (LoRA off, no gradient), the exact KL,
    the value head, the clipped surrogate, backward.
(b) the bare minimum on the same tokens: transformers' decoder forward on the guided batch with the
    LoRA on, ``logits.sum()`` backward, plus one no-gradient forward with the LoRA off.

Repeats are interleaved and the medians compared; the target is (a) / (b) <= 1.15.

    python benchmarks/musicrl_speed.py                          # tiny preset, batch 4, 10 s
    python benchmarks/musicrl_speed.py --backbone runs/tiny-musicgen-trained --duration 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rlmusic_pl.backbone.musicgen import delay
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules import MusicRLModule
from rlmusic_pl.rewards import SpectralCentroidReward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' or a MusicGen directory / hub id")
    parser.add_argument("--batch", type=int, default=4, help="samples in the minibatch")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per sample")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale (both passes run the guided batch)")
    parser.add_argument("--top-k", type=int, default=8, help="top-k of the policy (0: none)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    module = MusicRLModule(SpectralCentroidReward(), backbone=args.backbone, duration_s=args.duration, guidance_scale=args.guidance,
                           top_k=args.top_k, samples_per_prompt=args.batch, sample_batch_size=args.batch, train_batch_size=args.batch,
                           baseline="value", clip_range=0.2, text_length=16)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    for param in lora_parameters(module.backbone.decoder):
        param.data = 0.1 * torch.randn(param.shape, generator=generator)
    rollouts = module.sample_rollouts({"prompt": ["a bright C note"], "attributes": [{}]}, torch.Generator().manual_seed(1))
    rollouts.advantages = module.compute_advantages(rollouts)
    rows = torch.arange(args.batch)
    backbone = module.backbone
    tokens = delay(rollouts.codes, backbone.pad_token)[..., :-1]
    guided = rollouts.cond.guided()
    guided_tokens = torch.cat([tokens, tokens]).reshape(-1, tokens.shape[-1])

    def ours() -> None:
        module.loss_terms(rollouts, rows).loss.backward()

    def bare() -> None:
        decoder = backbone.decoder
        decoder(input_ids=guided_tokens, encoder_hidden_states=guided.hidden_states, encoder_attention_mask=guided.attention_mask).logits.sum().backward()
        with torch.no_grad(), lora_strength(decoder, 0.0):
            decoder(input_ids=guided_tokens, encoder_hidden_states=guided.hidden_states, encoder_attention_mask=guided.attention_mask)

    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for name, fn in (("ours", ours), ("bare", bare)):
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("bare", bare)):
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ours_s, bare_s = statistics.median(times["ours"]), statistics.median(times["bare"])
    frames = rollouts.codes.shape[-1]
    print(f"backbone={args.backbone} batch={args.batch} frames={frames} guidance={args.guidance} top_k={args.top_k} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    print(f"(a) MusicRL loss_terms + backward:                   median {ours_s * 1000:.1f} ms  ({' '.join(f'{t * 1000:.0f}' for t in times['ours'])})")
    print(f"(b) bare decoder fwd+bwd + reference fwd, same tokens: median {bare_s * 1000:.1f} ms  ({' '.join(f'{t * 1000:.0f}' for t in times['bare'])})")
    print(f"ratio (a)/(b): {ours_s / bare_s:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
