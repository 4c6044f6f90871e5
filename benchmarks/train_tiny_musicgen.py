"""Train a tiny MusicGen on labelled synthetic notes, so that its text conditioning works and can be measured.

The random tiny preset (``MusicGenBackbone.load("tiny")``) keeps the real model's interfaces but
its codec's codebooks are all zero and its decoder ignores the prompt. This script turns a slightly
larger preset (8 kHz, 4 codebooks of 64 codes at 50 frames/s, a decoder 128 wide with 3 layers)
into a small working text-to-music model on single notes from ``rlmusic_pl.data.synthetic``
(``labelled_notes``: a random pitch class in octave 3 or 4, bright or dull, 0.5 s):

1. EnCodec learns to auto-encode the clips: L1 between the waveform and its reconstruction, on whole
   clips that all start in phase with their note (spectral losses left the pitch at chance after
   decoding). The residual codebooks are buffers, trained as the original EnCodec trains them:
   k-means++ initialisation on the first batch's encoder outputs, exponential moving averages of
   the assigned vectors, dead codes re-seeded from the batch, a straight-through gradient to the
   encoder and a commitment loss.
2. The decoder learns the codes of each clip by cross-entropy (``MusicGenBackbone.log_probs``, which
   handles the delay pattern), conditioned on the prompt that describes the clip ("a bright C
   note", "a dull G note"), or on the null prompt of classifier-free guidance 10% of the time. The
   T5 text encoder keeps its random weights: frozen, it still maps different prompts to different
   (fixed) states, which is all the decoder needs.

The result is a directory (``save_pretrained`` of the model and the processor) that
``MusicGenBackbone.load(OUT)`` and ``backbone: OUT`` load like any other. Seeded by ``--seed``;
about 10 minutes on one thread with the defaults. ``benchmarks/tiny_musicgen_quality.py`` measures it.

    python benchmarks/train_tiny_musicgen.py runs/tiny-musicgen-trained
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_backbone import batch_of, train  # noqa: E402

from rlmusic_pl.backbone.conditioning import MusicGenConditioning  # noqa: E402
from rlmusic_pl.backbone.musicgen import MusicGenBackbone  # noqa: E402
from rlmusic_pl.backbone.tiny_musicgen import build_tiny_musicgen  # noqa: E402
from rlmusic_pl.data.audio import atomic_directory_write  # noqa: E402
from rlmusic_pl.data.synthetic import labelled_notes  # noqa: E402

SAMPLE_RATE = 8000
UPSAMPLING_RATIOS = (8, 5, 4)  # 160 samples per frame: 50 frames/s at 8 kHz
CODEBOOK_SIZE = 64
NUM_CODEBOOKS = 4
UNCONDITIONAL_FRACTION = 0.1
EMA_DECAY = 0.99
DEAD_CODE_THRESHOLD = 1.0  # EMA count (assignments per batch) below which a code is re-seeded
KMEANS_ITERATIONS = 10


def build_untrained(seed: int, hidden_size: int = 128, num_layers: int = 3, num_heads: int = 4) -> MusicGenBackbone:
    """The architecture this script trains, with random weights (``tiny_musicgen_quality.py`` compares against it)."""
    return MusicGenBackbone(*build_tiny_musicgen(
        seed, hidden_size, num_layers, num_heads, sample_rate=SAMPLE_RATE, codebook_size=CODEBOOK_SIZE,
        num_codebooks=NUM_CODEBOOKS, upsampling_ratios=UPSAMPLING_RATIOS,
    ))


def kmeans_plus_plus(vectors: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` centres of ``vectors`` [N, D]: k-means++ seeding, then a few Lloyd iterations."""
    centres = vectors[torch.randint(len(vectors), (1,), generator=generator)]
    for _ in range(count - 1):
        distance = torch.cdist(vectors, centres).min(dim=1).values.pow(2)
        centres = torch.cat([centres, vectors[torch.multinomial(distance + 1e-12, 1, generator=generator)]])
    for _ in range(KMEANS_ITERATIONS):
        assignment = torch.cdist(vectors, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=count)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres


class CodebookTrainer:
    """Drives the buffers of transformers' ``EncodecEuclideanCodebook``s as the original EnCodec trains them.

    ``quantize(embeddings)`` runs the residual quantizer on encoder outputs [B, D, F] and returns the
    quantized embeddings with a straight-through gradient and the commitment loss; in training it
    also updates the codebooks (initialised by k-means++ on the first call).
    """

    def __init__(self, quantizer: torch.nn.Module, generator: torch.Generator) -> None:
        self.codebooks = [layer.codebook for layer in quantizer.layers[:NUM_CODEBOOKS]]
        self.generator = generator
        self.initialised = False

    def quantize(self, embeddings: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        vectors = embeddings.permute(0, 2, 1).reshape(-1, embeddings.shape[1])  # [B*F, D]
        residual, quantized, commitment = vectors.detach(), torch.zeros_like(vectors), vectors.new_zeros(())
        for codebook in self.codebooks:
            if update and not self.initialised:
                self._initialise(codebook, residual)
            codes = codebook.quantize(residual)
            if update:
                self._update(codebook, residual, codes)
            chosen = codebook.embed[codes]
            # The encoder is pulled towards the sum of the codes chosen so far (the original's per-layer loss).
            commitment = commitment + torch.nn.functional.mse_loss(vectors, (quantized + chosen).detach())
            quantized, residual = quantized + chosen, residual - chosen
        self.initialised = self.initialised or update
        straight_through = vectors + (quantized - vectors).detach()
        return straight_through.view(embeddings.shape[0], embeddings.shape[2], -1).permute(0, 2, 1), commitment

    def _initialise(self, codebook: torch.nn.Module, vectors: Tensor) -> None:
        centres = kmeans_plus_plus(vectors, codebook.codebook_size, self.generator)
        codebook.embed.copy_(centres)
        codebook.embed_avg.copy_(centres)
        codebook.cluster_size.fill_(1.0)

    def _update(self, codebook: torch.nn.Module, vectors: Tensor, codes: Tensor) -> None:
        one_hot = torch.nn.functional.one_hot(codes, codebook.codebook_size).type_as(vectors)  # [N, V]
        codebook.cluster_size.mul_(EMA_DECAY).add_(one_hot.sum(0), alpha=1 - EMA_DECAY)
        codebook.embed_avg.mul_(EMA_DECAY).add_(one_hot.t() @ vectors, alpha=1 - EMA_DECAY)
        # Laplace smoothing keeps a code that is rarely chosen from dividing by ~0.
        total = codebook.cluster_size.sum()
        smoothed = (codebook.cluster_size + 1e-5) / (total + codebook.codebook_size * 1e-5) * total
        codebook.embed.copy_(codebook.embed_avg / smoothed[:, None])
        dead = codebook.cluster_size < DEAD_CODE_THRESHOLD
        if dead.any():
            fresh = vectors[torch.randint(len(vectors), (int(dead.sum()),), generator=self.generator)]
            codebook.embed[dead] = fresh
            codebook.embed_avg[dead] = fresh * DEAD_CODE_THRESHOLD
            codebook.cluster_size[dead] = DEAD_CODE_THRESHOLD


def train_codec(backbone: MusicGenBackbone, waves: Tensor, steps: int, batch_size: int, commitment_weight: float, seed: int) -> None:
    codec = backbone.audio_encoder.train()
    trainable = list(codec.encoder.parameters()) + list(codec.decoder.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    codebooks = CodebookTrainer(codec.quantizer, torch.Generator().manual_seed(seed + 1))

    def loss(generator: torch.Generator) -> Tensor:
        clips = batch_of(waves, batch_size, generator)[:, None]
        quantized, commitment = codebooks.quantize(codec.encoder(clips), update=True)
        output = codec.decoder(quantized)[..., : clips.shape[-1]]
        return (output - clips).abs().mean() + commitment_weight * commitment

    with torch.no_grad():  # the codebooks' first batch: k-means++ on the encoder's outputs before any step
        codebooks.quantize(codec.encoder(batch_of(waves, 4 * batch_size, torch.Generator().manual_seed(seed))[:, None]), update=True)
    train("codec", trainable, loss, steps, 3e-3, seed)
    codec.eval().requires_grad_(False)


def train_decoder(backbone: MusicGenBackbone, codes: Tensor, prompts: list[str], steps: int, batch_size: int, seed: int) -> None:
    cond = backbone.encode_prompts(prompts)
    decoder = backbone.decoder.train().requires_grad_(True)

    def loss(generator: torch.Generator) -> Tensor:
        index = torch.randint(len(codes), (batch_size,), generator=generator)
        # Zero states under a zero mask: the null prompt exactly as guidance builds it (MusicGenConditioning.unconditional).
        keep = (torch.rand(batch_size, generator=generator) >= UNCONDITIONAL_FRACTION).long()
        text = MusicGenConditioning(cond.hidden_states[index] * keep[:, None, None], cond.attention_mask[index] * keep[:, None])
        return -backbone.log_probs(codes[index], text, guidance_scale=1.0, top_k=None).log_probs.mean()

    train("decoder", list(decoder.parameters()), loss, steps, 2e-3, seed)
    decoder.eval().requires_grad_(False)


def save(backbone: MusicGenBackbone, directory: Path) -> None:
    backbone.model.save_pretrained(directory)
    backbone.processor.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory (a saved MusicGen: model and processor); replaced if it exists")
    parser.add_argument("--clips", type=int, default=2048, help="synthetic training clips (labelled single notes)")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per clip")
    parser.add_argument("--codec-steps", type=int, default=4000, help="EnCodec training steps")
    parser.add_argument("--decoder-steps", type=int, default=2000, help="decoder training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per training step")
    parser.add_argument("--commitment-weight", type=float, default=0.25, help="weight of the codec's commitment loss")
    parser.add_argument("--hidden-size", type=int, default=128, help="decoder width")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small tensors, and on a machine shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial weights, the data and the batches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)

    backbone = build_untrained(args.seed, args.hidden_size, args.layers)
    waves, labels = labelled_notes(args.clips, args.duration, seed=args.seed, sample_rate=SAMPLE_RATE)
    print(f"{args.clips} clips of {args.duration} s at {SAMPLE_RATE} Hz; {NUM_CODEBOOKS} codebooks of {CODEBOOK_SIZE}")
    train_codec(backbone, waves, args.codec_steps, args.batch_size, args.commitment_weight, args.seed)
    codes = torch.cat([backbone.encode_audio(chunk) for chunk in waves.split(256)])
    usage = [len(torch.unique(codes[:, k])) for k in range(NUM_CODEBOOKS)]
    print(f"  codes used per codebook: {usage} of {CODEBOOK_SIZE}")
    train_decoder(backbone, codes, [label.prompt() for label in labels], args.decoder_steps, args.batch_size, args.seed)
    # Built beside the output and swapped in, so a failed run never leaves half a model.
    atomic_directory_write(args.out, lambda directory: save(backbone, directory))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
