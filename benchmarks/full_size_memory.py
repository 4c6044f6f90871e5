"""Tensor memory of one DDPO epoch of configs/ddpo_clap.yaml on the full-size architecture, measured on a CPU.

For sessions without a GPU: it builds the full-size audioldm2-music architecture with random weights
(``full_size.py``) and a CLAP reward the size of ``laion/larger_clap_music`` (HTSAT-base audio tower,
RoBERTa-base text tower), with the config's settings (10 s, sample batch 4, train batch 1, CFG 3.5,
LoRA rank 4 on attention, frozen weights in 16 bits, LoRA and AdamW state in float32), and measures,
phase by phase, the bytes of live tensors: every storage an operation allocates is counted until it
is freed (``TensorMemory``). That is what ``torch.cuda.max_memory_allocated`` counts on a GPU, minus
its allocator's rounding and the kernels' workspaces. bfloat16 on the CPU (autocast and frozen
weights) stands in for float16 on the GPU: same bytes per element.

One DDPO epoch's phases run one after another, each freeing its activations before the next, so its
peak is the resident state (weights, LoRA, gradients, AdamW state, the epoch's stored trajectories)
plus the largest phase: prompt encoding, one guided sampling step (a sampling loop repeats it), VAE +
vocoder decoding, the CLAP reward, one training timestep (forward and backward; the training loop
repeats it, back-propagating each timestep before the next).

    python benchmarks/full_size_memory.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/full_size_memory.py --train-batch 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import LoRASettings, add_lora, lora_parameters
from rlmusic_pl.modules.ppo import clipped_surrogate

sys.path.insert(0, str(Path(__file__).parent))

GIB = 2**30


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of the tensor storages allocated inside the context while they are alive.

    ``peak`` is the most bytes alive at once, ``live`` what is still alive; storages that existed
    before the context (weights, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        # An output on an input's storage (a view, an in-place result) allocated nothing, even when
        # that input was made before the context (``linear`` views every weight through ``t``).
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for value in tree_leaves(output):
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in inputs:
                self._count(value.untyped_storage())
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._alive or storage.nbytes() == 0:
            return  # already counted
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_, key=key, size=size) -> None:
            self.live -= size
            self._alive.pop(key, None)

        self._alive[key] = weakref.ref(storage, freed)


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def module_bytes(module: nn.Module) -> int:
    return storage_bytes(*module.parameters(), *module.buffers())


def clap_like_larger_clap_music() -> ClapModel:
    """Random CLAP with the dimensions of laion/larger_clap_music (HTSAT-base, RoBERTa-base, 512-d)."""
    audio = ClapAudioConfig(patch_embeds_hidden_size=128, hidden_size=1024, depths=[2, 2, 12, 2],
                            num_attention_heads=[4, 8, 16, 32], projection_dim=512)
    return ClapModel(ClapConfig(text_config=ClapTextConfig(projection_dim=512).to_dict(), audio_config=audio.to_dict(), projection_dim=512))


def measure(name: str, phase: Callable[[], object], results: dict[str, int]) -> object:
    start = time.perf_counter()
    with TensorMemory() as memory:
        output = phase()
    results[name] = memory.peak
    print(f"  {name:28s} peak {memory.peak / GIB:6.2f} GiB   ({time.perf_counter() - start:.0f} s)", flush=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of audio per sample (config: 10)")
    parser.add_argument("--sample-batch", type=int, default=4, help="samples per sampling UNet batch (config: 4)")
    parser.add_argument("--train-batch", type=int, default=1, help="samples per training minibatch (config: 1)")
    parser.add_argument("--trajectories", type=int, default=32, help="trajectories stored per epoch (config: 4 prompts x 8)")
    parser.add_argument("--steps", type=int, default=19, help="DDIM steps per trajectory (config: 19)")
    parser.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (config: 4)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in the backward pass")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from full_size import full_size_pipeline

    dtype, guidance, eta = torch.bfloat16, 3.5, 1.0
    print("building the full-size architecture (random weights) ...", flush=True)
    backbone = AudioLDM2Backbone(full_size_pipeline(dtype))
    add_lora(backbone.unet, LoRASettings(rank=args.lora_rank, targets="attention", init_seed=0))
    if args.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    reward = clap_like_larger_clap_music().eval().requires_grad_(False)
    lora = lora_parameters(backbone.unet)
    optimizer = torch.optim.AdamW(lora, lr=3e-4)
    autocast = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731

    prompts = ["A recording of a happy piano solo, high quality"] * args.sample_batch
    negatives = ["Low quality, multiple sound sources"] * args.sample_batch
    results: dict[str, int] = {}
    print(f"phases ({args.duration} s, sample batch {args.sample_batch}, train batch {args.train_batch}, CFG {guidance}):", flush=True)
    with autocast():
        cond = measure("prompt encoding", lambda: backbone.encode_prompts(prompts, negatives), results)
    noise = backbone.initial_latents(args.sample_batch, args.duration, torch.Generator().manual_seed(0))
    backbone.set_timesteps(args.steps)
    t = backbone.scheduler.timesteps[args.steps // 2]

    @torch.no_grad()
    def sampling_step():
        with autocast():
            return backbone.ddim_step(backbone.predict_noise(noise, t, cond, guidance), t, noise, eta)

    next_latents, old_log_prob = measure("guided sampling step", sampling_step, results)

    @torch.no_grad()
    def decode():
        with autocast():
            return backbone.decode(next_latents, args.duration)

    waveforms = measure("VAE + vocoder decoding", decode, results)

    @torch.no_grad()
    def clap_audio_embedding():
        # CLAPReward's audio path: 48 kHz, 10 s, 64-bin fused-off features of the HTSAT tower.
        features = torch.randn(len(waveforms), 1, 1001, 64, dtype=reward.dtype)
        return reward.get_audio_features(input_features=features, is_longer=torch.zeros(len(waveforms), 1, dtype=torch.bool))

    measure("CLAP reward (audio tower)", clap_audio_embedding, results)

    rows = slice(0, args.train_batch)
    train_cond = cond[rows]

    def training_timestep():
        with autocast():
            eps = backbone.predict_noise(noise[rows], t, train_cond, guidance)
            _, log_prob = backbone.ddim_step(eps, t, noise[rows], eta, prev_latents=next_latents[rows])
            loss = clipped_surrogate(log_prob, old_log_prob[rows], torch.ones(args.train_batch), 1e-4).loss
        loss.backward()
        optimizer.step()  # the first step allocates AdamW's state: resident from then on

    measure("training timestep", training_timestep, results)

    frozen = {"UNet (without LoRA)": module_bytes(backbone.unet) - storage_bytes(*lora)}
    for name in ("vae", "vocoder", "text_encoder", "text_encoder_2", "projection_model", "language_model"):
        frozen[name] = module_bytes(getattr(backbone, name))
    frozen["CLAP reward"] = module_bytes(reward)
    latent_bytes = noise[0].numel() * 4
    state = {
        "LoRA weights + gradients + AdamW state (float32)": 4 * storage_bytes(*lora),
        f"stored trajectories ({args.trajectories} x {args.steps + 1} latents, float32)": args.trajectories * (args.steps + 1) * latent_bytes,
    }
    print("resident:")
    for name, size in {**frozen, **state}.items():
        print(f"  {name:55s} {size / GIB:6.2f} GiB")
    resident = sum(frozen.values()) + sum(state.values())
    largest = max(results, key=results.get)
    print(f"resident total {resident / GIB:.2f} GiB; largest phase: {largest} {results[largest] / GIB:.2f} GiB")
    print(f"peak of one DDPO epoch (resident + largest phase): {(resident + results[largest]) / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
