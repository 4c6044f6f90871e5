"""Is the trained tiny MusicGen a working text-to-music model? Codec reconstruction, codebook usage, conditioning.

On held-out labelled notes (``labelled_notes`` with ``--seed``, which the training run never saw
when it differs from the training seed), for the trained directory and for the same architecture
with random weights (``train_tiny_musicgen.build_untrained``: transformers initialises the
codebooks to zero, so the random codec maps every clip to one code):

1. EnCodec reconstruction: log-mel L1 between the held-out clips and their encode -> decode round
   trip, and the pitch-class accuracy of the round trip (``estimate_pitch_class``; chance 1/12).
2. Codebook usage: the perplexity of each codebook's codes over the held-out clips (at most the codebook size).
3. Conditioning: each held-out label's prompt ("a dull F# note") is sampled (temperature 1, no top-k,
   one generator per sample) at each guidance scale; the decoded audio's strongest pitch class is
   compared with the prompt's (``PitchClassReward(hard=True)``; chance 1/12). And brightness: the
   spectral centroid of the samples of "bright" prompts against that of "dull" prompts (each held-out
   pitch class and octave both ways, at the largest guidance scale), beside the centroids of the
   held-out clips and of their codec round trips.

    python benchmarks/tiny_musicgen_quality.py runs/tiny-musicgen-trained
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_musicgen import build_untrained  # noqa: E402

from rlmusic_pl.backbone.musicgen import MusicGenBackbone  # noqa: E402
from rlmusic_pl.data.audio import MelConfig, log_mel  # noqa: E402
from rlmusic_pl.data.synthetic import NEGATIVE, POSITIVE, NoteLabel, labelled_notes  # noqa: E402
from rlmusic_pl.rewards.pitch import PitchClassReward, estimate_pitch_class  # noqa: E402
from rlmusic_pl.rewards.simple import SpectralCentroidReward  # noqa: E402


def mel_config(sample_rate: int) -> MelConfig:
    """A log-mel at the codec's rate: 32 ms windows, 10 ms hops, 40 bands up to the Nyquist frequency."""
    n_fft = 2 ** round(torch.log2(torch.tensor(0.032 * sample_rate)).item())
    return MelConfig(sample_rate=sample_rate, n_fft=n_fft, hop_length=sample_rate // 100, win_length=n_fft, n_mels=40,
                     f_max=sample_rate / 2)


def perplexity(codes: Tensor, codebook_size: int) -> float:
    """exp(entropy) of the histogram of ``codes``: the number of equally used codes it amounts to."""
    share = torch.bincount(codes.flatten(), minlength=codebook_size).float() / codes.numel()
    return torch.exp(-(share * share.clamp(min=1e-12).log()).sum()).item()


def centroids_by_brightness(waves: Tensor, sample_rate: int, labels: list[NoteLabel]) -> str:
    """Mean spectral centroid (Hz) of the bright and of the dull clips, as "bright / dull"."""
    centroid = SpectralCentroidReward(normalize=False)(waves, sample_rate, [], [])
    means = [centroid[torch.tensor([label.brightness == side for label in labels])].mean().item() for side in (POSITIVE, NEGATIVE)]
    return " / ".join(f"{mean:.0f}" for mean in means)


def codec_quality(backbone: MusicGenBackbone, waves: Tensor, labels: list[NoteLabel]) -> dict[str, float | list[float] | str]:
    codes = backbone.encode_audio(waves)
    reconstruction = backbone.decode(codes)[:, : waves.shape[1]]
    config = mel_config(backbone.sample_rate)
    target = torch.tensor([label.pitch_class for label in labels])
    return {
        "log_mel_l1": (log_mel(reconstruction, config) - log_mel(waves, config)).abs().mean().item(),
        "pitch_accuracy": (estimate_pitch_class(reconstruction, backbone.sample_rate) == target).float().mean().item(),
        "perplexity": [perplexity(codes[:, k], backbone.codebook_size) for k in range(backbone.num_codebooks)],
        "centroids": centroids_by_brightness(reconstruction, backbone.sample_rate, labels),
    }


def generate(backbone: MusicGenBackbone, prompts: list[str], duration: float, guidance_scale: float, seed: int) -> Tensor:
    """One sample per prompt, each drawn with its own generator (seed + index), decoded to [B, T]."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    sample = backbone.sample(backbone.encode_prompts(prompts), backbone.num_frames(duration), guidance_scale=guidance_scale,
                             top_k=None, generator=generators)
    return backbone.decode(sample.codes)


def conditioning_quality(backbone: MusicGenBackbone, labels: list[NoteLabel], duration: float, scales: list[float],
                         seed: int) -> dict[str, float]:
    prompts = [label.prompt() for label in labels]
    attributes = [label.attributes() for label in labels]
    accuracy = PitchClassReward(hard=True)
    results = {}
    for scale in scales:
        audio = generate(backbone, prompts, duration, scale, seed)
        results[f"pitch_accuracy@{scale:g}"] = accuracy(audio, backbone.sample_rate, prompts, attributes).mean().item()
    # Every held-out pitch class and octave once as "bright" and once as "dull".
    sided = [NoteLabel(label.pitch_class, label.octave, side) for side in (POSITIVE, NEGATIVE) for label in labels]
    audio = generate(backbone, [label.prompt() for label in sided], duration, max(scales), seed)
    results[f"centroid bright / dull (Hz)@{max(scales):g}"] = centroids_by_brightness(audio, backbone.sample_rate, sided)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained", help="the directory benchmarks/train_tiny_musicgen.py wrote")
    parser.add_argument("--clips", type=int, default=96, help="held-out clips and prompts")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per clip and per generated sample")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0],
                        help="classifier-free guidance scales of the conditioning test (0: unconditional)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the held-out clips and the samples (training used another)")
    parser.add_argument("--baseline-seed", type=int, default=0, help="seed of the random-weight model compared against")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    models = {"trained": MusicGenBackbone.load(args.trained), "random": build_untrained(args.baseline_seed)}
    sample_rate = models["trained"].sample_rate
    waves, labels = labelled_notes(args.clips, args.duration, seed=args.seed, sample_rate=sample_rate)
    print(f"{args.clips} held-out clips (seed {args.seed}) of {args.duration} s at {sample_rate} Hz; chance pitch accuracy {1 / 12:.3f}; "
          f"centroid bright / dull (Hz) {centroids_by_brightness(waves, sample_rate, labels)}")
    for name, backbone in models.items():
        codec = codec_quality(backbone, waves, labels)
        perplexities = " / ".join(f"{p:.1f}" for p in codec["perplexity"])
        print(f"{name} codec: log-mel L1 {codec['log_mel_l1']:.3f}, reconstruction pitch accuracy {codec['pitch_accuracy']:.3f}, "
              f"perplexity per codebook {perplexities} (of {backbone.codebook_size}), centroid bright / dull (Hz) {codec['centroids']}")
        conditioning = conditioning_quality(backbone, labels, args.duration, args.guidance_scales, args.seed)
        print(f"{name} conditioning: " + ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                                                     for key, value in conditioning.items()), flush=True)


if __name__ == "__main__":
    main()
