"""DDPO overheads, measured side by side in one run (these machines are noisy: read the ratios).

(a) our sampling loop with log-probs vs diffusers' ``AudioLDM2Pipeline.__call__`` (same DDIM
    scheduler, steps, batch, guidance, eta; both encode prompts, denoise, VAE-decode and vocode);
    target: at most 1.10x.
(b) one DDPO training timestep (guided UNet call, DDIM log-prob, clipped loss, backward) vs a bare
    UNet forward+backward on the same guided batch with the same LoRA; target: at most 1.15x.
(c) peak memory (CUDA: max allocated; CPU: the process's peak RSS).

On a CUDA GPU the full-size audioldm2-music architecture (random weights) is used with the settings of
configs/ddpo_clap.yaml (10 s, 19 steps, CFG 3.5, sample batch 4, train batch 1, 16-mixed, float16
frozen weights) and samples per second are reported; on a CPU, the tiny preset.

    python benchmarks/ddpo_speed.py                 # tiny on CPU
    python benchmarks/ddpo_speed.py --repeats 5     # more repeats
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import LoRASettings, add_lora
from rlmusic_pl.modules.ppo import clipped_surrogate

sys.path.insert(0, str(Path(__file__).parent))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def interleaved(first, second, repeats: int) -> tuple[float, float]:
    """Median times of two functions run alternately (after one warm-up each)."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(first))
        b.append(timed(second))
    return statistics.median(a), statistics.median(b)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (medians are compared)")
    parser.add_argument("--batch", type=int, default=None, help="samples per call (default: 4 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 19 on CUDA, 10 on CPU)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of audio (default: 10 on CUDA, 2 on CPU)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    batch, steps, duration = args.batch or (4 if cuda else 2), args.steps or (19 if cuda else 10), args.duration or (10.0 if cuda else 2.0)
    guidance, eta = 3.5, 1.0

    if cuda:
        from full_size import full_size_pipeline

        backbone = AudioLDM2Backbone(full_size_pipeline(torch.float16)).to(device)
        autocast = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
        label = "full-size audioldm2-music architecture (random weights), float16 frozen, 16-mixed"
    else:
        backbone = AudioLDM2Backbone.load("tiny")
        autocast = contextlib.nullcontext
        label = "tiny preset, float32, 1 CPU thread"
    add_lora(backbone.unet, LoRASettings(rank=4, targets="attention", init_seed=0))
    pipeline = backbone.pipeline
    pipeline.scheduler = backbone.scheduler
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["A recording of a happy piano solo, high quality"] * batch
    negatives = ["Low quality, multiple sound sources"] * batch

    def ours() -> None:
        with torch.no_grad(), autocast():
            generator = torch.Generator(device).manual_seed(0)
            cond = backbone.encode_prompts(prompts, negatives)
            result = backbone.sample(cond, backbone.initial_latents(batch, duration, generator), steps, guidance, eta, generator)
            backbone.decode(result.final, duration)

    def diffusers_pipeline() -> None:
        with autocast():
            pipeline(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                     audio_length_in_s=duration, output_type="pt", generator=torch.Generator(device).manual_seed(0))

    sample_ours, sample_pipe = interleaved(ours, diffusers_pipeline, args.repeats)

    # (b) one training timestep on a guided batch of train_batch_size 1 (as in configs/ddpo_clap.yaml on GPU).
    train_batch = 1 if cuda else batch
    with torch.no_grad(), autocast():
        cond = backbone.encode_prompts(prompts[:train_batch], negatives[:train_batch])
    latents = backbone.initial_latents(train_batch, duration, torch.Generator(device).manual_seed(1))
    backbone.set_timesteps(steps)
    t = backbone.scheduler.timesteps[steps // 2]
    with torch.no_grad(), autocast():
        next_latents, old_log_prob = backbone.ddim_step(backbone.predict_noise(latents, t, cond, guidance), t, latents, eta)
    advantages = torch.ones(train_batch, device=device)
    guided = cond.guided()

    def training_timestep() -> None:
        with autocast():
            eps = backbone.predict_noise(latents, t, cond, guidance)
            _, log_prob = backbone.ddim_step(eps, t, latents, eta, prev_latents=next_latents)
            loss = clipped_surrogate(log_prob, old_log_prob, advantages, 1e-4).loss
        loss.backward()

    def bare_unet() -> None:
        with autocast():
            out = backbone.unet(torch.cat([latents, latents]), t, encoder_hidden_states=guided.generated,
                                encoder_hidden_states_1=guided.t5, encoder_attention_mask_1=guided.t5_mask, return_dict=False)[0]
        out.float().mean().backward()

    train_ours, train_bare = interleaved(training_timestep, bare_unet, args.repeats * 3)

    print(f"# {label}; device {device}; batch {batch}, {steps} steps, {duration} s, CFG {guidance}, eta {eta}")
    print(f"(a) sampling   ours {sample_ours:.3f} s   diffusers pipeline {sample_pipe:.3f} s   ratio {sample_ours / sample_pipe:.3f} (target <= 1.10)")
    print(f"(b) train step ours {train_ours * 1e3:.1f} ms   bare UNet fwd+bwd {train_bare * 1e3:.1f} ms   ratio {train_ours / train_bare:.3f} (target <= 1.15)")
    print(f"(c) peak memory {peak_memory_gb():.2f} GB; sampling throughput {batch / sample_ours:.2f} samples/s")


if __name__ == "__main__":
    main()
