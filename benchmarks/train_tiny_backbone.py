"""Train the tiny AudioLDM2 briefly on synthetic notes, so that DDPO's learning can be shown on a CPU.

The random tiny preset keeps the real model's interfaces but is no generative model: its UNet's
noise prediction makes DDIM's latents explode (std ~22), its decoder normalises them away and its
random vocoder imposes its own spectrum, so no policy moves an audio reward much
(``benchmarks/tiny_reward_sensitivity.py``). This script turns the same architecture into a small
working text-to-audio model on synthetic data (``rlmusic_pl.data.synthetic``: notes of random
pitch, timing and brightness):

1. the vocoder learns mel -> waveform (L1 between the log-mels of its output and of the clip, plus a
   linear-magnitude term: mel spectral convergence and the output's drift below 40 Hz; a HiFi-GAN of
   32 channels with V1's dilations 1, 3, 5): with the log-mel L1 alone and 16 channels it rendered
   bright and dull mels at the same audio centroid (``benchmarks/brightness_chain.py``), so nothing
   that moved the latents could move the audio's brightness, and without the drift term a third of its
   output sat below the mel's lowest band;
2. the VAE learns to auto-encode the log-mels; its scaling factor is set so latents have unit std;
3. the UNet learns to predict the noise of noised latents (DDPM objective, the scheduler's betas),
   conditioned on prompts unrelated to the audio (and the empty prompt 10% of the time).

The result is a diffusers directory that ``AudioLDM2Backbone.load(OUT)``, ``DDPOModule(backbone=OUT)``
and ``benchmarks/ddpo_learning.py --backbone OUT`` load like any other checkpoint. Seeded by
``--seed``; about 13 minutes on 2 CPU cores with the defaults.

    python benchmarks/train_tiny_backbone.py runs/tiny-trained
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.tiny import build_tiny_pipeline, tiny_vocoder
from rlmusic_pl.data.audio import AUDIOLDM_MEL, atomic_directory_write, log_mel
from rlmusic_pl.data.synthetic import note_plan, render_notes
from rlmusic_pl.rewards.simple import magnitude_spectrogram

PROMPTS = [
    "a bright piano", "a calm guitar", "an angry drum", "a happy violin", "a soft flute", "a loud trumpet",
    "a sad cello", "a tender harp", "an upbeat organ", "a gentle melody", "a dark synth", "a lively tune",
]
UNCONDITIONAL_FRACTION = 0.1
STAGES = ("vocoder", "vae", "unet")
DRIFT_HZ = 40.0


def synthetic_clips(count: int, duration_s: float, seed: int) -> Tensor:
    """``count`` clips of random notes whose brightness (harmonic roll-off 1/k^1 .. 1/k^4) is random too."""
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(count):
        rolloff = 1.0 + 3.0 * torch.rand((), generator=generator).item()
        clips.append(render_notes(note_plan(generator, duration_s, notes_per_second=3.0), duration_s, rolloff))
    return torch.stack(clips)


def train(name: str, params: list[Tensor], loss_fn: Callable[[Tensor], Tensor], steps: int, lr: float, seed: int) -> None:
    """AdamW with cosine decay on ``loss_fn(step_generator)``; prints the loss every tenth of the run."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    every = max(1, steps // 10)
    start, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        loss = loss_fn(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            print(f"  {name} step {step}/{steps}: loss {sum(losses) / len(losses):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            losses = []


def batch_of(data: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    return data[torch.randint(len(data), (batch_size,), generator=generator)]


def linear_magnitude_loss(output: Tensor, target: Tensor, mel_output: Tensor, mel_target: Tensor) -> Tensor:
    """Mel spectral convergence ``||M(output) - M(target)|| / ||M(target)||`` plus the output's drift below 40 Hz.

    The log-mel L1 weighs every band alike, so quiet bands (most of a dull clip) cost as much as loud
    ones; spectral convergence weighs them by energy, as the spectral centroid does. The mel's lowest
    triangle is 0 at 0 Hz, so a vocoder trained on mels alone drifts slowly there (20-40 % of its
    output's STFT magnitude below 47 Hz, against 0.1-0.2 % in the clips), which pulls every centroid
    towards 0; the second term is the output's STFT magnitude there relative to the clip's (no
    synthetic note is below 110 Hz: a clean clip's own, window leakage, is ~1 %). ``mel_output`` and
    ``mel_target`` are the clips' log-mels, which the log-mel L1 has computed already.
    """
    linear_out, linear_target = mel_output.exp(), mel_target.exp()
    spec_out, freqs = magnitude_spectrogram(output, AUDIOLDM_MEL.sample_rate, AUDIOLDM_MEL.n_fft)
    spec_target, _ = magnitude_spectrogram(target, AUDIOLDM_MEL.sample_rate, AUDIOLDM_MEL.n_fft)
    drift = spec_out[:, freqs < DRIFT_HZ].norm() / spec_target.norm()
    return (linear_out - linear_target).norm() / linear_target.norm() + drift


def train_vocoder(backbone: AudioLDM2Backbone, waves: Tensor, mels: Tensor, steps: int, batch_size: int, linear_weight: float, seed: int) -> None:
    vocoder = backbone.vocoder.train().requires_grad_(True)

    def loss(generator: torch.Generator) -> Tensor:
        index = torch.randint(len(waves), (batch_size,), generator=generator)
        output, target = vocoder(mels[index])[:, : waves.shape[1]], waves[index]
        mel_output, mel_target = log_mel(output), log_mel(target)
        return (mel_output - mel_target).abs().mean() + linear_weight * linear_magnitude_loss(output, target, mel_output, mel_target)

    train("vocoder", list(vocoder.parameters()), loss, steps, 2e-3, seed)
    vocoder.eval().requires_grad_(False)


def train_vae(backbone: AudioLDM2Backbone, mels: Tensor, steps: int, batch_size: int, kl_weight: float, seed: int) -> None:
    vae = backbone.vae.train().requires_grad_(True)

    def loss(generator: torch.Generator) -> Tensor:
        mel = batch_of(mels, batch_size, generator).unsqueeze(1)
        posterior = vae.encode(mel).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        return (vae.decode(latents).sample - mel).abs().mean() + kl_weight * posterior.kl().mean()

    train("vae", list(vae.parameters()), loss, steps, 2e-3, seed)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([vae.encode(chunk.unsqueeze(1)).latent_dist.mode() for chunk in mels.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    print(f"  vae: latent std {std:.3f} -> scaling_factor {1.0 / std:.3f}")


def train_unet(backbone: AudioLDM2Backbone, mels: Tensor, steps: int, batch_size: int, seed: int) -> None:
    with torch.no_grad():
        latents = torch.cat([backbone.mel_to_latents(chunk) for chunk in mels.split(64)])
        texts = PROMPTS + [""]
        cond = backbone.encode_prompts(texts).positive
    unet = backbone.unet.train().requires_grad_(True)
    scheduler = backbone.scheduler
    empty = len(PROMPTS)

    def loss(generator: torch.Generator) -> Tensor:
        x0 = batch_of(latents, batch_size, generator)
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prompt = torch.randint(len(PROMPTS), (batch_size,), generator=generator)
        prompt = torch.where(torch.rand(batch_size, generator=generator) < UNCONDITIONAL_FRACTION, empty, prompt)
        text = cond.map(lambda t: t[prompt])
        eps = unet(
            scheduler.add_noise(x0, noise, timesteps), timesteps, encoder_hidden_states=text.generated,
            encoder_hidden_states_1=text.t5, encoder_attention_mask_1=text.t5_mask, return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(eps, noise)

    train("unet", list(unet.parameters()), loss, steps, 1e-3, seed)
    unet.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory (a diffusers AudioLDM2 pipeline); replaced if it exists")
    parser.add_argument("--clips", type=int, default=512, help="synthetic training clips")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per clip")
    parser.add_argument("--vocoder-steps", type=int, default=1500, help="vocoder training steps")
    parser.add_argument("--vocoder-channels", type=int, default=32, help="vocoder channels after its input convolution (halved by each upsampling)")
    parser.add_argument("--vocoder-dilations", type=int, nargs="+", default=[1, 3, 5], help="dilations of the vocoder's residual block (HiFi-GAN V1: 1 3 5)")
    parser.add_argument(
        "--vocoder-linear-weight", type=float, default=4.0,
        help="weight of the vocoder's linear-magnitude loss (mel spectral convergence + drift below 40 Hz) beside the log-mel L1",
    )
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps")
    parser.add_argument("--unet-steps", type=int, default=2000, help="UNet training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per training step")
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the VAE's KL term")
    parser.add_argument(
        "--init", default=None,
        help="start from this pipeline directory instead of random tiny weights (with --stages, to retrain one part)",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="what to train, in this order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial weights, the data and the batches")
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1),
        help="torch threads; use 1 when other jobs share the cores (oversubscribed threads slow steps ~10x)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)

    backbone = AudioLDM2Backbone.load(args.init) if args.init else AudioLDM2Backbone(build_tiny_pipeline(args.seed))
    waves = synthetic_clips(args.clips, args.duration, args.seed)
    mels = log_mel(waves)
    frames = backbone.latent_shape(args.duration)[1] * backbone.vae_scale_factor
    mels = torch.nn.functional.pad(mels, (0, 0, 0, frames - mels.shape[1]), value=mels.min().item())
    print(f"{args.clips} clips of {args.duration} s; log-mel {tuple(mels.shape[1:])}")
    if "vocoder" in args.stages:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            backbone.pipeline.vocoder = backbone.vocoder = tiny_vocoder(args.vocoder_channels, tuple(args.vocoder_dilations))
        train_vocoder(backbone, waves, mels, args.vocoder_steps, args.batch_size, args.vocoder_linear_weight, args.seed)
    if "vae" in args.stages:
        train_vae(backbone, mels, args.vae_steps, args.batch_size, args.kl_weight, args.seed)
    if "unet" in args.stages:
        train_unet(backbone, mels, args.unet_steps, args.batch_size, args.seed)
    # Built beside the output and swapped in, so a failed run never leaves half a model.
    atomic_directory_write(args.out, backbone.pipeline.save_pretrained)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
