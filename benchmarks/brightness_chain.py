"""Where does brightness get lost between a mel and the audio? Spectral centroids along AudioLDM2's decoding chain.

For the synthetic bright and dull contrast sets (the slider's training data), the mean spectral
centroid (fraction of Nyquist) of:

  (a) the sets' own audio;
  (b) their log-mels rendered by the backbone's vocoder;
  (c) their log-mels through the VAE (encode, decode) and then the vocoder;

and, beside each, the *mel centroid* of the log-mel that was rendered (the magnitude-weighted mean
of the mel bands' centre frequencies), i.e. what the vocoder was asked to produce. A chain that
carries brightness keeps the bright - dull difference of (a) in (b) and (c); if (b) loses it, no
change of the latents (a slider, DDPO) can move the audio centroid by much.

    python benchmarks/brightness_chain.py --backbone runs/tiny-trained
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.data.audio import AUDIOLDM_MEL, _mel_basis, load_audio, log_mel
from rlmusic_pl.data.synthetic import NEGATIVE, POSITIVE, write_contrast_sets
from rlmusic_pl.rewards.simple import SpectralCentroidReward


def mel_centroid(mel: Tensor) -> Tensor:
    """Centroids [B] (fraction of Nyquist) of AudioLDM log-mels [B, frames, 64]: band centres weighted by magnitude."""
    basis = _mel_basis(AUDIOLDM_MEL)
    freqs = torch.linspace(0, AUDIOLDM_MEL.sample_rate / 2, basis.shape[1])
    centres = (basis * freqs).sum(1) / basis.sum(1)
    magnitude = mel.float().exp()
    return (magnitude * centres).sum((1, 2)) / magnitude.sum((1, 2)) / (AUDIOLDM_MEL.sample_rate / 2)


def audio_centroid(waveforms: Tensor, sample_rate: int = AUDIOLDM_MEL.sample_rate) -> Tensor:
    """The spectral centroid [B] (fraction of Nyquist) that the benchmarks report: ``SpectralCentroidReward``."""
    return SpectralCentroidReward()(waveforms.float(), sample_rate, [""] * len(waveforms), [{}] * len(waveforms))


def contrast_audio(directory: str, count: int, duration_s: float) -> dict[str, Tensor]:
    """The bright and dull sets' clips [count, T] (written on first use, like ``SyntheticContrastSets``)."""
    folders = dict(zip((POSITIVE, NEGATIVE), write_contrast_sets(directory, count, duration_s)))
    return {side: torch.stack([load_audio(path) for path in sorted(Path(folder).glob("*.wav"))]) for side, folder in folders.items()}


@torch.no_grad()
def chain_centroids(backbone: AudioLDM2Backbone, waves: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(audio centroid, mel centroid of the rendered mel) [B] at each stage of the chain."""
    mel = log_mel(waves)
    vae_mel = backbone.latents_to_mel(backbone.mel_to_latents(mel))[:, : mel.shape[1]]
    return {
        "(a) audio": (audio_centroid(waves), mel_centroid(mel)),
        "(b) vocoder(mel)": (audio_centroid(backbone.mel_to_waveform(mel)), mel_centroid(mel)),
        "(c) vocoder(VAE(mel))": (audio_centroid(backbone.mel_to_waveform(vae_mel)), mel_centroid(vae_mel)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="runs/tiny-trained", help="a trained tiny pipeline directory (or 'tiny')")
    parser.add_argument("--sets", default="runs/synthetic/brightness", help="folder of the synthetic contrast sets")
    parser.add_argument("--count", type=int, default=8, help="clips per side")
    parser.add_argument("--duration-s", type=float, default=2.0, help="seconds per clip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = AudioLDM2Backbone.load(args.backbone)
    sides = {side: chain_centroids(backbone, waves) for side, waves in contrast_audio(args.sets, args.count, args.duration_s).items()}
    print(f"backbone {args.backbone}; {args.count} clips of {args.duration_s} s per side; centroids as fractions of Nyquist")
    print(f"{'stage':24s} {'audio bright':>12s} {'dull':>7s} {'diff':>7s}   {'mel bright':>10s} {'dull':>7s} {'diff':>7s}")
    for stage in sides[POSITIVE]:
        (audio_b, mel_b), (audio_d, mel_d) = sides[POSITIVE][stage], sides[NEGATIVE][stage]
        print(f"{stage:24s} {audio_b.mean():12.4f} {audio_d.mean():7.4f} {audio_b.mean() - audio_d.mean():+7.4f}   "
              f"{mel_b.mean():10.4f} {mel_d.mean():7.4f} {mel_b.mean() - mel_d.mean():+7.4f}")


if __name__ == "__main__":
    main()
