"""The reward interface: a batched torch callable from generated audio (and its prompts) to scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmusic_pl.data.audio import AudioError, check_waveforms
from rlmusic_pl.errors import RLMusicError


class RewardError(RLMusicError, ValueError):
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

    @property
    def required_attributes(self) -> frozenset[str]:
        """Prompt attributes this reward reads: every prompt it scores must have them (default: none)."""
        return frozenset()

    def check_prompts(self, prompts: list[str], attributes: list[dict[str, str]]) -> None:
        """RewardError naming the first prompt this reward cannot score (checked before any sampling).

        The default checks ``required_attributes``; a subclass may also check the values.
        """
        for prompt, attrs in zip(prompts, attributes):
            missing = sorted(self.required_attributes - attrs.keys())
            if missing:
                raise RewardError(f"reward {self.name!r} needs the prompt attribute(s) {missing}, "
                                  f"but prompt {prompt!r} has only {sorted(attrs)}")

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


class CallableReward(Reward):
    """A plain function ``(waveforms [B, T], sample_rate, prompts, attributes) -> [B]`` as a Reward.

    Its outputs get the same checks as every reward's (``evaluate``: finite, shape [B]). Modules and
    ``WeightedReward`` wrap a plain function given as a reward in it.

    Args:
        function: the batched scoring function (a function, or any callable such as an ``nn.Module``).
        name: the name under which it is reported (default: the function's name).
    """

    def __init__(self, function: Callable, name: str | None = None) -> None:
        function_name = getattr(function, "__name__", "")
        super().__init__(name or (function_name if function_name.isidentifier() else "reward"))
        self.function = function

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        return self.function(waveforms, sample_rate, prompts, attributes)


def as_reward(reward: Reward | Callable, owner: str) -> Reward:
    """``reward`` itself, a plain function wrapped in ``CallableReward``, or RewardError naming ``owner``."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, type):
        raise RewardError(f"{owner}: got the class {reward.__name__}, not a reward; give an instance, e.g. {reward.__name__}()")
    if callable(reward):
        return CallableReward(reward)
    raise RewardError(
        f"{owner}: expected a Reward or a function (waveforms [B, T], sample_rate, prompts, attributes) -> [B], got {reward!r}"
    )


def as_rewards(rewards: Iterable[Reward | Callable] | None, owner: str) -> list[Reward]:
    """``as_reward`` of each of ``rewards`` (None: none), errors naming ``owner[index]``."""
    return [as_reward(reward, f"{owner}[{index}]") for index, reward in enumerate(rewards or [])]


def check_rewards_for_prompts(rewards: Iterable[Reward], datamodule, splits: Iterable[str]) -> None:
    """RewardError, before any sampling, if a prompt of ``splits`` lacks what one of ``rewards`` needs.

    ``datamodule`` lists its prompts by split (``PromptAttributeDataModule.split``); the prompts of
    other data modules are known only once sampled and are not checked here.
    """
    if not callable(getattr(datamodule, "split", None)):
        return
    for split in splits:
        items = datamodule.split(split)
        for reward in rewards:
            try:
                reward.check_prompts([item["prompt"] for item in items], [item["attributes"] for item in items])
            except RewardError as err:
                raise RewardError(f"{split} prompts: {err}") from None
