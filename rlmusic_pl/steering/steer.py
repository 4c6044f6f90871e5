"""Steered generation: forward hooks that add ``coefficient x time factor x layer weight x direction`` to decoder layers.

    directions = ConceptDirections.load("runs/rfm_note/directions")
    steer = SteeringDirection.from_directions(directions, "E", coefficient=0.5, layer_mode="exp_weighting",
                                              schedule=time_schedule("exp_decay", rate=0.998), inject_chance=0.3)
    with Steering(backbone, [steer], rows="both", seed=0):
        sample = backbone.sample(cond, backbone.num_frames(5.0))

What the hooks do (and the published MusicRFM code's bugs they avoid):

- The direction is added to every position of every steered row of the batch. A layer returns a
  tensor on ``transformers`` 5.x and a tuple on 4.x; only the tuple's first item is the hidden states.
  (Taking ``output[0]`` of a 5.x tensor is the first batch row: the published code steers one sample.)
- The step counter is a pre-hook on the decoder stack: it advances once per decoder call, i.e. once per
  generated step, whether or not any layer injected (the published counter advances only on injection,
  which stretches a decay by 1 / inject chance).
- The inject chance is a coin flip per direction, per layer and per step, for every direction of a
  multi-direction steer (the published multi-direction path ignores inject chances).
- ``rows="conditional"`` steers only the conditional half of the classifier-free-guidance batch
  [conditional; unconditional]; ``"both"`` steers every row (the published default).
- A coefficient may be one number or one per sample (a sweep generates several coefficients in one batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.steering.activations import decoder_layers, layer_hidden
from rlmusic_pl.steering.directions import ConceptDirections

Schedule = Callable[[int], float]
SCHEDULES = ("constant", "exp_decay", "linear_decay", "linear_ramp")
LAYER_MODES = ("all", "top_k", "exp_weighting")
Rows = Literal["both", "conditional"]


class SteeringError(RLMusicError, ValueError):
    """Steering settings that cannot be used (an unknown schedule, a chance outside [0, 1], a width mismatch)."""


def time_schedule(kind: str = "constant", rate: float = 0.998, steps: int = 1500) -> Schedule:
    """The factor of the coefficient at generation step t (0 for the first step).

    ``constant``: 1; ``exp_decay``: rate^t; ``linear_decay``: max(0, 1 - t / steps);
    ``linear_ramp``: min(1, t / steps) (from 0 up to the full coefficient). Any callable of the step works too.
    """
    if kind == "constant":
        return lambda step: 1.0
    if kind == "exp_decay":
        if not 0 < rate <= 1:
            raise SteeringError(f"the exp_decay rate must be in (0, 1], got {rate}")
        return lambda step: rate**step
    if kind in ("linear_decay", "linear_ramp"):
        if steps < 1:
            raise SteeringError(f"schedule_steps must be >= 1, got {steps}")
        if kind == "linear_decay":
            return lambda step: max(0.0, 1.0 - step / steps)
        return lambda step: min(1.0, step / steps)
    raise SteeringError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


def layer_weights(scores: Tensor, mode: str = "all", top_k: int = 16, base: float = 1.0, decay: float = 0.95) -> Tensor:
    """[n_layers] weights of the layers from their probe scores.

    ``all``: 1 everywhere; ``top_k``: 1 on the k best-scoring layers, 0 elsewhere; ``exp_weighting``:
    base x (min-max normalised score)^(1 / decay), so the best layer gets ``base`` and the worst 0.
    """
    scores = scores.float()
    if mode == "all":
        return torch.ones_like(scores)
    if mode == "top_k":
        if top_k < 1:
            raise SteeringError(f"top_k must be >= 1, got {top_k}")
        weights = torch.zeros_like(scores)
        weights[scores.topk(min(top_k, len(scores))).indices] = 1.0
        return weights
    if mode == "exp_weighting":
        if decay <= 0:
            raise SteeringError(f"weight_decay must be > 0, got {decay}")
        spread = scores.max() - scores.min()
        normalised = (scores - scores.min()) / spread if spread > 0 else torch.ones_like(scores)
        return base * normalised ** (1.0 / decay)
    raise SteeringError(f"layer_mode must be one of {LAYER_MODES}, got {mode!r}")


@dataclass
class SteeringDirection:
    """One direction to steer along, with its own strength, time schedule and inject chance.

    Attributes:
        vectors: [n_layers, D] what is added per unit coefficient in each layer (direction x layer weight).
        layers: the decoder-layer index of each row of ``vectors``.
        coefficient: the steering strength: a number, or one per sample [B] (negative steers away).
        schedule: the factor of the coefficient at each generation step (``time_schedule``).
        inject_chance: probability of adding the direction in a layer at a step (coin per layer per step).
    """

    vectors: Tensor
    layers: list[int]
    coefficient: float | Tensor = 1.0
    schedule: Schedule = field(default_factory=time_schedule)
    inject_chance: float = 1.0

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or len(self.layers) != self.vectors.shape[0]:
            raise SteeringError(f"vectors must be [n_layers, D] with one layer index per row, got {tuple(self.vectors.shape)} "
                                f"and {len(self.layers)} layers")
        if not 0.0 <= self.inject_chance <= 1.0:
            raise SteeringError(f"inject_chance must be in [0, 1], got {self.inject_chance}")

    @classmethod
    def from_directions(
        cls, directions: ConceptDirections, concept: str, coefficient: float | Tensor = 1.0, component: int = 0,
        layer_mode: str = "all", top_k: int = 16, weight_base: float = 1.0, weight_decay: float = 0.95,
        schedule: Schedule | None = None, inject_chance: float = 1.0,
    ) -> SteeringDirection:
        """The ``concept``'s direction from a direction file, weighted per layer by ``layer_weights``."""
        weights = layer_weights(directions.layer_scores(concept), layer_mode, top_k, weight_base, weight_decay)
        return cls(directions.vectors(concept, component) * weights[:, None], list(directions.layers), coefficient,
                   schedule or time_schedule(), inject_chance)


class Steering:
    """Context manager: while active, the backbone's decoder layers add the directions to their outputs.

    Args:
        backbone: the MusicGen backbone.
        directions: the directions to add (each with its coefficient, schedule and inject chance).
        rows: ``both`` (every row) or ``conditional`` (the first half: the conditional rows of a guided batch).
        seed: seed of the inject-chance coin flips.
        record: keep ``applied``, a list of (step, layer, direction index, factor) for every injection.

    ``step`` is the generation step of the current decoder call (0 for the first one).
    """

    def __init__(self, backbone: MusicGenBackbone, directions: Sequence[SteeringDirection], rows: Rows = "both",
                 seed: int = 0, record: bool = False) -> None:
        if rows not in ("both", "conditional"):
            raise SteeringError(f"rows must be 'both' or 'conditional', got {rows!r}")
        layers = decoder_layers(backbone)
        width = backbone.decoder.config.hidden_size
        for direction in directions:
            if direction.vectors.shape[-1] != width:
                raise SteeringError(f"the direction is {direction.vectors.shape[-1]} wide but the decoder's hidden size is {width}: "
                                    "it was learned on another backbone")
            if any(not 0 <= layer < len(layers) for layer in direction.layers):
                raise SteeringError(f"direction layers {direction.layers} outside the decoder's {len(layers)} layers")
        self.backbone = backbone
        self.directions = list(directions)
        self.rows = rows
        self.seed = seed
        self.record = record
        self.applied: list[tuple[int, int, int, float]] = []
        self.step = -1
        self._handles: list = []

    def __enter__(self) -> Steering:
        self.step = -1
        self.applied = []
        self._coins = torch.Generator().manual_seed(self.seed)
        self._handles = [self.backbone.decoder.model.decoder.register_forward_pre_hook(self._advance)]
        for index, layer in enumerate(decoder_layers(self.backbone)):
            self._handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _advance(self, module: nn.Module, args) -> None:
        self.step += 1  # every decoder call is one generated step, injected or not

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            hidden = layer_hidden(output)
            delta = None
            for index, direction in enumerate(self.directions):
                if layer not in direction.layers:
                    continue
                # The coin is flipped for every direction, layer and step (chance 1 always injects, 0 never).
                if not float(torch.rand((), generator=self._coins)) < direction.inject_chance:
                    continue
                factor = float(direction.schedule(self.step))
                if self.record:
                    self.applied.append((self.step, layer, index, factor))
                scale = self.row_coefficients(direction.coefficient, hidden.shape[0]) * factor
                if not bool((scale != 0).any()):
                    continue
                vector = direction.vectors[direction.layers.index(layer)].to(hidden)
                term = scale.to(hidden)[:, None, None] * vector  # [rows, 1, D]: every position of every steered row
                delta = term if delta is None else delta + term
            if delta is None:
                return None
            hidden = hidden + delta
            return hidden if isinstance(output, Tensor) else (hidden, *output[1:])
        return hook

    def row_coefficients(self, coefficient: float | Tensor, rows: int) -> Tensor:
        """[rows]: the coefficient of each row of the decoder batch (0 on rows that are not steered)."""
        steered = rows // 2 if self.rows == "conditional" else rows
        if self.rows == "conditional" and rows % 2:
            raise SteeringError(f"rows='conditional' needs a guided batch [conditional; unconditional], got {rows} rows")
        if isinstance(coefficient, Tensor) and coefficient.dim() > 0:
            samples = len(coefficient)
            if steered % samples:
                raise SteeringError(f"{samples} per-sample coefficients for a decoder batch of {rows} rows")
            values = coefficient.float().repeat(steered // samples)
        else:
            value = float(coefficient)
            if not math.isfinite(value):
                raise SteeringError(f"the coefficient must be finite, got {value}")
            values = torch.full((steered,), value)
        return torch.cat([values, torch.zeros(rows - steered)])
