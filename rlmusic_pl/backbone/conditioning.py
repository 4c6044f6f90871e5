"""Per-sample text conditioning of the AudioLDM2 UNet, for a prompt and its negative prompt."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TextConditioning:
    """What the UNet reads from one side (prompt or negative prompt) of classifier-free guidance.

    Attributes:
        generated: GPT-2 generated embeddings, the UNet's ``encoder_hidden_states`` [B, 8, D].
        t5: T5 embeddings, ``encoder_hidden_states_1`` [B, L, D1], padded to a fixed length L.
        t5_mask: ``encoder_attention_mask_1`` [B, L].
    """

    generated: Tensor
    t5: Tensor
    t5_mask: Tensor

    def map(self, fn) -> TextConditioning:
        return TextConditioning(*(fn(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def cat(items: list[TextConditioning]) -> TextConditioning:
        return TextConditioning(*(torch.cat([getattr(i, f.name) for i in items]) for f in fields(TextConditioning)))


@dataclass
class PromptConditioning:
    """Conditioning of a batch for guided sampling: the positive and the negative side, per sample.

    Stored with each trajectory so that training recomputes exactly the policy that sampled it.
    Indexing (``cond[idx]``), ``to`` and ``PromptConditioning.cat`` act on the batch dimension.
    """

    positive: TextConditioning
    negative: TextConditioning

    def __len__(self) -> int:
        return self.positive.generated.shape[0]

    def map(self, fn) -> PromptConditioning:
        """Apply ``fn`` to every tensor of both sides."""
        return PromptConditioning(self.positive.map(fn), self.negative.map(fn))

    def __getitem__(self, index) -> PromptConditioning:
        return self.map(lambda t: t[index])

    def to(self, *args, **kwargs) -> PromptConditioning:
        return self.map(lambda t: t.to(*args, **kwargs))

    def repeat_interleave(self, repeats: int) -> PromptConditioning:
        return self.map(lambda t: t.repeat_interleave(repeats, 0))

    @staticmethod
    def cat(items: list[PromptConditioning]) -> PromptConditioning:
        return PromptConditioning(
            TextConditioning.cat([i.positive for i in items]), TextConditioning.cat([i.negative for i in items])
        )

    def guided(self) -> TextConditioning:
        """Both sides stacked as one batch, negative first: the order of the guided UNet call."""
        return TextConditioning.cat([self.negative, self.positive])
