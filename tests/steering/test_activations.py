"""Pooled decoder-layer activations of the tiny MusicGen."""

import pytest
import torch

from rlmusic_pl.backbone.musicgen import MusicGenBackbone, delay
from rlmusic_pl.steering.activations import collect_activations, layer_hidden, pool


@pytest.fixture(scope="module")
def backbone():
    return MusicGenBackbone.load("tiny")


def test_layer_outputs_of_both_transformers_versions():
    hidden = torch.randn(2, 3, 4)
    assert layer_hidden(hidden) is hidden  # 5.x: a tensor
    assert layer_hidden((hidden, None)) is hidden  # 4.x: a tuple


def test_pooling():
    hidden = torch.tensor([[[1.0, 5.0], [3.0, -1.0]]])
    assert pool(hidden, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, "last").tolist() == [[3.0, -1.0]]
    assert pool(hidden, "max").tolist() == [[3.0, 5.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, "median")


def test_activations_are_the_layer_outputs_per_clip(backbone):
    codes = torch.randint(0, backbone.codebook_size, (3, backbone.num_codebooks, 10), generator=torch.Generator().manual_seed(0))
    activations = collect_activations(backbone, codes, "mean")
    assert activations.shape == (3, 2, 64)
    tokens = delay(codes, backbone.pad_token)[..., :-1]
    states = backbone.decoder.model(input_ids=tokens.reshape(-1, tokens.shape[-1]), output_hidden_states=True).hidden_states
    assert torch.allclose(activations[:, 0], states[1].mean(1), atol=1e-6)  # layer 0's output (not the embeddings)
    assert torch.allclose(collect_activations(backbone, codes[1:2], "last"), collect_activations(backbone, codes, "last")[1:2], atol=1e-6)
    assert collect_activations(backbone, codes, "max", layers=[1]).shape == (3, 1, 64)
