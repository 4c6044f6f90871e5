"""Per-sample text conditioning of both backbones: indexable and concatenable over the batch.

A trajectory stores the conditioning it was sampled under, so that training recomputes exactly the
policy that sampled it. ``BatchedTensors`` gives these dataclasses their batch operations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T", bound="BatchedTensors")


class BatchedTensors:
    """Batch operations for a dataclass whose fields are tensors [B, ...] or such dataclasses.

    Indexing (``cond[idx]``), ``to``, ``repeat_interleave`` and ``cat`` act on the batch dimension.
    """

    def map(self: T, fn) -> T:
        """Apply ``fn`` to every tensor (of nested dataclasses too)."""
        return type(self)(*(_map(getattr(self, f.name), fn) for f in fields(self)))

    def __len__(self) -> int:
        first = getattr(self, fields(self)[0].name)
        return len(first) if isinstance(first, BatchedTensors) else first.shape[0]

    def __getitem__(self: T, index) -> T:
        return self.map(lambda t: t[index])

    def to(self: T, *args, **kwargs) -> T:
        return self.map(lambda t: t.to(*args, **kwargs))

    def repeat_interleave(self: T, repeats: int) -> T:
        return self.map(lambda t: t.repeat_interleave(repeats, 0))

    @classmethod
    def cat(cls: type[T], items: list[T]) -> T:
        """Concatenate along the batch."""
        return cls(*(_cat([getattr(i, f.name) for i in items]) for f in fields(cls)))


def _map(value, fn):
    return value.map(fn) if isinstance(value, BatchedTensors) else fn(value)


def _cat(values: list):
    return type(values[0]).cat(values) if isinstance(values[0], BatchedTensors) else torch.cat(values)


@dataclass
class TextConditioning(BatchedTensors):
    """What the AudioLDM2 UNet reads from one side (prompt or negative prompt) of classifier-free guidance.

    Attributes:
        generated: GPT-2 generated embeddings, the UNet's ``encoder_hidden_states`` [B, 8, D].
        t5: T5 embeddings, ``encoder_hidden_states_1`` [B, L, D1], padded to a fixed length L.
        t5_mask: ``encoder_attention_mask_1`` [B, L].
    """

    generated: Tensor
    t5: Tensor
    t5_mask: Tensor


@dataclass
class PromptConditioning(BatchedTensors):
    """Conditioning of an AudioLDM2 batch for guided sampling: the positive and the negative side, per sample."""

    positive: TextConditioning
    negative: TextConditioning

    def guided(self) -> TextConditioning:
        """Both sides stacked as one batch, negative first: the order of the guided UNet call."""
        return TextConditioning.cat([self.negative, self.positive])


@dataclass
class MusicGenConditioning(BatchedTensors):
    """What the MusicGen decoder's cross-attention reads for a batch of prompts.

    The states are the T5 encoder's, projected to the decoder width when the widths differ and
    multiplied by the mask, exactly as ``MusicgenForConditionalGeneration`` feeds its decoder.

    Attributes:
        hidden_states: [B, L, D], padded to a fixed length L (padding rows are zero).
        attention_mask: [B, L], 1 for prompt tokens.
    """

    hidden_states: Tensor
    attention_mask: Tensor

    def unconditional(self) -> MusicGenConditioning:
        """The null prompt of classifier-free guidance, as transformers builds it: zero states and a zero mask."""
        return MusicGenConditioning(torch.zeros_like(self.hidden_states), torch.zeros_like(self.attention_mask))

    def guided(self) -> MusicGenConditioning:
        """The guided decoder batch: conditional first, then unconditional (transformers' order)."""
        return MusicGenConditioning.cat([self, self.unconditional()])
