"""MusicGen backbone overheads side by side in one run, and full-size memory (these machines are noisy: read the ratios).

On the tiny preset (one CPU thread, or the GPU when there is one), medians of interleaved repeats:
(a) our sampling loop with per-token log-probs vs ``MusicgenForConditionalGeneration.generate`` for the
    same prompts, batch, length, guidance, temperature and top-k (both encode the text, decode the
    delayed codes with a KV cache and EnCodec-decode the audio); target: at most 1.05x;
(b) the teacher-forced log-prob pass (delay pattern, guided decoder call, guidance, top-k,
    log-softmax, gather) vs a bare decoder forward on the same guided batch of the same codes;
    target: at most 1.05x; and the same pass without top-k.

Full size (random weights, bfloat16 frozen weights, LoRA rank 4 on attention in float32, AdamW):
musicgen-small and -medium architectures (``full_size_musicgen.py``), phase by phase: prompt
encoding, guided sampling with the KV cache, EnCodec decoding, and a MusicRL-like training step
(reference distributions at LoRA strength 0, policy log-probs with distributions and hidden states,
policy-gradient loss with a value head on the hidden states plus the exact KL, backward, AdamW step). On CUDA: peak allocated memory and
tokens (codes) per second. Without CUDA: the bytes of live tensors per phase, counted as
``full_size_memory.py`` does (``TensorMemory``), on one CPU thread.

    python benchmarks/musicgen_speed.py                        # tiny side by side + full-size small and medium
    python benchmarks/musicgen_speed.py --full-size none       # tiny side by side only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlmusic_pl.backbone.musicgen import MusicGenBackbone, delay
from rlmusic_pl.lora import LoRASettings, add_lora, lora_parameters, lora_strength

sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "a bright C note on a piano at 90 bpm"


def tiny_side_by_side(args, device: torch.device) -> None:
    from ddpo_speed import interleaved

    backbone = MusicGenBackbone.load("tiny", text_length=args.text_length).to(device)
    prompts = [PROMPT] * args.batch
    frames = backbone.num_frames(args.duration)
    policy = dict(guidance_scale=args.guidance, temperature=args.temperature, top_k=args.top_k)
    inputs = backbone.processor(text=prompts, padding="max_length", max_length=args.text_length, truncation=True, return_tensors="pt").to(device)

    @torch.no_grad()
    def ours() -> None:
        cond = backbone.encode_prompts(prompts)
        backbone.decode(backbone.sample(cond, frames, generator=torch.Generator(device).manual_seed(0), **policy).codes)

    def transformers_generate() -> None:
        backbone.model.generate(**inputs, max_new_tokens=frames + backbone.num_codebooks - 1, do_sample=True, **policy)

    sample_ours, sample_theirs = interleaved(ours, transformers_generate, args.repeats)

    cond = backbone.encode_prompts(prompts)
    codes = backbone.sample(cond, frames, generator=torch.Generator(device).manual_seed(1), **policy).codes
    tokens = delay(codes, backbone.pad_token)[..., :-1]
    guided_tokens, guided = torch.cat([tokens, tokens]).reshape(-1, tokens.shape[-1]), cond.guided()

    @torch.no_grad()
    def teacher_forced() -> None:
        backbone.log_probs(codes, cond, **policy)

    @torch.no_grad()
    def bare_decoder() -> None:
        backbone.decoder(input_ids=guided_tokens, encoder_hidden_states=guided.hidden_states, encoder_attention_mask=guided.attention_mask)

    @torch.no_grad()
    def teacher_forced_without_top_k() -> None:
        backbone.log_probs(codes, cond, args.guidance, args.temperature, None)

    score_ours, score_bare = interleaved(teacher_forced, bare_decoder, args.repeats * 3)
    score_all, score_bare_again = interleaved(teacher_forced_without_top_k, bare_decoder, args.repeats * 3)

    print(f"# tiny preset on {device}: batch {args.batch}, {args.duration} s ({frames} frames x {backbone.num_codebooks} codebooks), "
          f"CFG {args.guidance}, temperature {args.temperature}, top-k {args.top_k}, {args.repeats} repeats")
    print(f"(a) our sampling loop with log-probs / generate():  {sample_ours:.3f} s / {sample_theirs:.3f} s = {sample_ours / sample_theirs:.3f}  (target <= 1.05)")
    print(f"(b) teacher-forced log-probs / bare decoder forward: {1e3 * score_ours:.1f} ms / {1e3 * score_bare:.1f} ms = {score_ours / score_bare:.3f}  (target <= 1.05)")
    print(f"    the same without top-k (torch.topk is slow on a CPU): {1e3 * score_all:.1f} ms / {1e3 * score_bare_again:.1f} ms = {score_all / score_bare_again:.3f}")


def full_size(size: str, args, device: torch.device) -> None:
    from full_size_memory import GIB, TensorMemory, module_bytes, storage_bytes
    from full_size_musicgen import full_size_musicgen

    cuda = device.type == "cuda"
    print(f"# full-size musicgen-{size} architecture (random weights) on {device}: batch {args.full_batch}, {args.full_duration} s, "
          f"CFG {args.guidance}, temperature {args.temperature}, top-k {args.full_top_k}, LoRA rank {args.lora_rank} on attention", flush=True)
    backbone = full_size_musicgen(size, torch.bfloat16, device, args.text_length)
    add_lora(backbone.decoder, LoRASettings(rank=args.lora_rank, targets="attention", init_seed=0))
    value_head = torch.nn.Linear(backbone.decoder.config.hidden_size, 1, device=device)
    lora = lora_parameters(backbone.decoder)
    optimizer = torch.optim.AdamW([*lora, *value_head.parameters()], lr=1e-5)
    prompts = [PROMPT] * args.full_batch
    frames = backbone.num_frames(args.full_duration)
    tokens = args.full_batch * backbone.num_codebooks * frames
    policy = dict(guidance_scale=args.guidance, temperature=args.temperature, top_k=args.full_top_k)
    peaks: dict[str, float] = {}

    def phase(name: str, fn: Callable[[], object], counted_tokens: int | None = None) -> object:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if cuda:
            output = fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        else:
            with TensorMemory() as memory:
                output = fn()
            peaks[name] = memory.peak
        seconds = time.perf_counter() - start
        rate = f", {counted_tokens / seconds:8.0f} tokens/s" if counted_tokens else ""
        kind = "peak allocated" if cuda else "peak above resident"
        print(f"  {name:58s} {kind} {peaks[name] / GIB:6.2f} GiB   ({seconds:.1f} s{rate})", flush=True)
        return output

    if cuda:  # kernels and cuBLAS handles are set up by the first calls, not timed
        backbone.sample(backbone.encode_prompts(prompts), 2, **policy)
    cond = phase("prompt encoding (T5)", lambda: backbone.encode_prompts(prompts))
    sample = phase("guided sampling, KV cache", lambda: backbone.sample(cond, frames, generator=torch.Generator(device).manual_seed(0), **policy), tokens)
    phase("EnCodec decoding", lambda: backbone.decode(sample.codes))
    rewards = torch.randn(args.full_batch, 1, 1, device=device)

    def training_step() -> None:
        # MusicRL's step: the reference policy is the same decoder with its LoRA at strength 0; both are
        # scored without top-k so that the exact KL is finite; a value head reads the hidden states.
        with torch.no_grad(), lora_strength(backbone.decoder, 0.0):
            reference = backbone.log_probs(sample.codes, cond, args.guidance, args.temperature, None, return_distributions=True).distributions
        scores = backbone.log_probs(sample.codes, cond, args.guidance, args.temperature, None, return_distributions=True, return_hidden_states=True)
        values = value_head(scores.hidden_states.float()).squeeze(-1)
        kl = (scores.distributions.exp() * (scores.distributions - reference)).sum(-1)
        loss = -(scores.log_probs * (rewards - values.detach())).mean() + 0.1 * kl.mean() + (values - rewards).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phase("training step (reference + policy, KL, backward, AdamW)", training_step, tokens)

    frozen = {name: module_bytes(getattr(backbone, name)) for name in ("text_encoder", "audio_encoder")}
    frozen["decoder (without LoRA)"] = module_bytes(backbone.decoder) - storage_bytes(*lora)
    resident = sum(frozen.values()) + 4 * storage_bytes(*lora)
    parts = ", ".join(f"{name} {size_ / GIB:.2f}" for name, size_ in frozen.items())
    print(f"  resident: {parts}, LoRA + gradients + AdamW state {4 * storage_bytes(*lora) / GIB:.3f}: {resident / GIB:.2f} GiB")
    largest = max(peaks, key=peaks.get)
    if not cuda:
        print(f"  peak (resident + largest phase, {largest}): {(resident + peaks[largest]) / GIB:.2f} GiB")
    del backbone, optimizer, lora, value_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each side of (a); (b) uses 3x as many")
    parser.add_argument("--batch", type=int, default=4, help="tiny side by side: prompts per call")
    parser.add_argument("--duration", type=float, default=10.0, help="tiny side by side: seconds of audio")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (MusicGen's default 3)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=8, help="tiny side by side: top-k (of 32 codes, about musicgen's 250 of 2048)")
    parser.add_argument("--text-length", type=int, default=64, help="T5 tokens per prompt")
    parser.add_argument("--full-size", nargs="*", default=["small", "medium"], choices=["small", "medium", "none"], help="full-size architectures to measure")
    parser.add_argument("--full-batch", type=int, default=2, help="full size: samples per batch")
    parser.add_argument("--full-duration", type=float, default=10.0, help="full size: seconds of audio")
    parser.add_argument("--full-top-k", type=int, default=250, help="full size: top-k when sampling (musicgen's default)")
    parser.add_argument("--lora-rank", type=int, default=4, help="full size: LoRA rank on the decoder's attention")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the delay token outside the vocabulary warns on every config
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # with more threads than free cores, small ops get far slower
    tiny_side_by_side(args, device)
    for size in args.full_size:
        if size != "none":
            full_size(size, args, device)


if __name__ == "__main__":
    main()
