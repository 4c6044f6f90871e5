"""Pooled per-layer activations of MusicGen's decoder on the codes of labelled clips.

Each decoder layer's output (the residual stream after that layer, before the final LayerNorm:
exactly where a steering hook adds its direction) is captured by a forward hook, so every layer,
the last included, is read where it is steered (``output_hidden_states``' last entry is after the
LayerNorm). On ``transformers`` 5.x a layer returns a tensor, on 4.x a tuple whose first item is the
hidden states; ``layer_hidden`` handles both.

The decoder reads the clip's codes in the delay pattern, behind the begin token, as in generation,
with no text (the published MusicRFM code runs the decoder without text too): its cross-attention
is skipped. Pooling over the positions: ``mean`` (notes), ``last`` (suggested for tempo) or ``max``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from rlmusic_pl.backbone.musicgen import MusicGenBackbone, delay

Pooling = Literal["mean", "last", "max"]
POOLINGS = ("mean", "last", "max")


def decoder_layers(backbone: MusicGenBackbone) -> nn.ModuleList:
    """The decoder's transformer layers (``decoder.model.decoder.layers``)."""
    return backbone.decoder.model.decoder.layers


def layer_hidden(output: Tensor | tuple) -> Tensor:
    """The hidden states [B, S, D] of a decoder layer's output: a tensor (transformers 5.x) or a tuple's first item (4.x)."""
    return output if isinstance(output, Tensor) else output[0]


def pool(hidden: Tensor, pooling: Pooling) -> Tensor:
    """[B, S, D] -> [B, D] over the positions."""
    if pooling == "mean":
        return hidden.mean(1)
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "max":
        return hidden.amax(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.no_grad()
def collect_activations(backbone: MusicGenBackbone, codes: Tensor, pooling: Pooling = "mean", layers: list[int] | None = None) -> Tensor:
    """[B, n_layers, D] pooled outputs of the decoder ``layers`` (default: all) on codes [B, K, F] (one length per call)."""
    backbone.check_codes(codes)
    all_layers = decoder_layers(backbone)
    layers = list(range(len(all_layers))) if layers is None else layers
    captured: dict[int, Tensor] = {}

    def capture(index: int):
        def hook(module: nn.Module, args, output) -> None:
            captured[index] = pool(layer_hidden(output).float(), pooling)
        return hook

    handles = [all_layers[i].register_forward_hook(capture(i)) for i in layers]
    try:
        tokens = delay(codes.to(backbone.device), backbone.pad_token)[..., :-1]  # the decoder's inputs, as in sampling
        backbone.decoder.model(input_ids=tokens.reshape(-1, tokens.shape[-1]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in layers], dim=1).cpu()
