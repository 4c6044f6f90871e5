"""A weighted sum of named rewards, each also reported on its own (MusicRL-R style combination)."""

from __future__ import annotations

from torch import Tensor, nn

from rlmusic_pl.rewards.base import Reward, as_reward


def weights_by_name(owner: str, rewards: dict, weights: dict[str, float] | None) -> dict[str, float]:
    """Each named reward's weight (default 1.0), after checking the names; errors name ``owner``."""
    if not rewards:
        raise ValueError(f"{owner}: `rewards` is empty; give at least one named reward")
    bad_names = [key for key in rewards if not key or "." in key]
    if bad_names:
        raise ValueError(f"{owner}: reward names must be non-empty and contain no '.', got {bad_names}")
    unknown = sorted(set(weights or {}) - set(rewards))
    if unknown:
        raise ValueError(f"{owner}: weights name unknown rewards {unknown}; the rewards are {sorted(rewards)}")
    return {key: float((weights or {}).get(key, 1.0)) for key in rewards}


class WeightedReward(Reward):
    """Total = sum over named rewards of weight * that reward's own total.

    Components: each sub-reward's total under its key; a sub-reward made of several components
    also reports each of them as ``"key/component"``.

    Args:
        rewards: the rewards to combine, by the name used for logging (no ``.`` in names); a plain
            function is wrapped in ``CallableReward``.
        weights: weight per reward name; rewards not named here get 1.0.
        name: the name under which the total is logged.
    """

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float] | None = None, name: str = "total") -> None:
        super().__init__(name)
        self.weights = weights_by_name(type(self).__name__, rewards, weights)
        owner = type(self).__name__
        self.rewards = nn.ModuleDict({key: as_reward(reward, f"{owner} reward {key!r}") for key, reward in rewards.items()})

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        return self.combine(self.components(waveforms, sample_rate, prompts, attributes))

    def components(
        self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]
    ) -> dict[str, Tensor]:
        values = {}
        for key, reward in self.rewards.items():
            parts = reward.components(waveforms, sample_rate, prompts, attributes)
            values[key] = reward.combine(parts)
            if len(parts) > 1:
                values.update({f"{key}/{part}": value for part, value in parts.items()})
        return values

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        return sum(weight * components[key] for key, weight in self.weights.items())

    @property
    def required_attributes(self) -> frozenset[str]:
        return frozenset().union(*(reward.required_attributes for reward in self.rewards.values()))

    def check_prompts(self, prompts: list[str], attributes: list[dict[str, str]]) -> None:
        for reward in self.rewards.values():
            reward.check_prompts(prompts, attributes)
