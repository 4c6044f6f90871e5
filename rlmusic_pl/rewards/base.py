"""The reward interface: a batched torch callable from generated audio (and its prompts) to scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmusic_pl.data.audio import AudioError, check_waveforms


class RewardError(ValueError):
    """A reward got bad input or produced a bad (non-finite or mis-shaped) value; the message names it."""


@dataclass
class RewardResult:
    """The scalar reward per sample and every named component it was made of."""

    total: Tensor
    components: dict[str, Tensor]


class Reward(nn.Module):
    """Base class of rewards: ``(waveforms [B, T], sample_rate, prompts, attributes) -> [B]``.

    Subclasses implement ``forward``. Rewards are ``nn.Module`` so that, as attributes of a
    LightningModule, they move to its device once and stay there. Callers should use
    ``evaluate``, which checks the input and every output component.

    Args:
        name: the name under which this reward is reported and logged.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Reward:
        # Rewards are fixed judges: when the trainer puts the policy (and so its children) in train
        # mode, dropout and batch-norm statistics of reward models must stay frozen.
        return super().train(False)

    def components(
        self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]
    ) -> dict[str, Tensor]:
        """Every named value this reward is made of (a plain reward has one: its own)."""
        return {self.name: self(waveforms, sample_rate, prompts, attributes)}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        """The scalar reward per sample from ``components``."""
        return components[self.name]

    @torch.no_grad()
    def evaluate(
        self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]
    ) -> RewardResult:
        """Score a batch, checking the input and that every component is a finite [B] tensor."""
        try:
            check_waveforms(waveforms, name=f"reward {self.name!r}: waveforms")
        except AudioError as err:
            raise RewardError(str(err)) from err
        batch = waveforms.shape[0]
        if len(prompts) != batch or len(attributes) != batch:
            raise RewardError(
                f"reward {self.name!r}: got {batch} waveforms but {len(prompts)} prompts and {len(attributes)} attribute sets"
            )
        try:
            components = self.components(waveforms, sample_rate, prompts, attributes)
        except AudioError as err:
            raise RewardError(f"reward {self.name!r}: {err}") from err
        for name, values in components.items():
            check_reward_values(name, values, batch)
        total = self.combine(components)
        check_reward_values(self.name, total, batch)
        return RewardResult(total=total.float(), components={k: v.float() for k, v in components.items()})


def check_reward_values(name: str, values: Tensor, batch: int) -> None:
    """Raise RewardError unless ``values`` is a finite tensor of shape [batch]."""
    if not isinstance(values, Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise RewardError(f"reward {name!r} returned {shape}; expected a tensor of shape ({batch},)")
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned NaN or inf for samples {bad}; refusing to train on it")
