"""Stage 2's gain schedule: multipliers of every LoRA scale layer's gain as a function of strength and step (DESIGN.md §7).

RLScale-LoRA's Stage 2 trains the scale layers (``rlmusic_pl.lora.ScaleLayer``) so that intermediate
strengths move smoothly. A ``GainSchedule`` holds, per LoRA layer (optionally per channel), the
coefficients theta of a multiplier ``m(s, t) = 1 + theta . phi(s, t)`` of the Stage-1 gain, with
features ``phi`` of the strength s and the diffusion step t (``conditioning``). theta = 0 is the
Stage-1 slider exactly. A forward pre-hook on the UNet sets every scale layer's ``modulation`` at
each call, and ``actions`` lets one batch run a different theta per sample (PPO's rollouts).

File format (unchanged since the first Stage-2 adapters): ``gain_schedule.safetensors`` in the
adapter directory, one tensor ``mean`` (theta, flat [D], float32) and metadata ``rlmusic_pl``: the
JSON of ``GainSchedule.settings`` (``conditioning``, ``per_channel``, ``num_train_timesteps``, and since
``shared`` was added, ``shared``; files without it load as per-layer schedules).
``load_gain_schedule`` (used by ``SweepModule`` and the benchmarks) attaches it to a UNet that
holds the adapter's LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rlmusic_pl.data.audio import atomic_write
from rlmusic_pl.lora import LoRAError, scale_layers

GAIN_SCHEDULE = "gain_schedule.safetensors"
Conditioning = Literal["none", "strength", "strength_step", "interior"]
FEATURES = {"none": 1, "strength": 2, "strength_step": 4, "interior": 2}


def schedule_features(conditioning: str, strength: Tensor, step_fraction: Tensor) -> Tensor:
    """Features [R, K] of per-sample strengths [R] at the step fraction t / T (a scalar tensor)."""
    one = torch.ones_like(strength)
    if conditioning == "none":
        return one[:, None]
    if conditioning == "strength":
        return torch.stack([one, strength], 1)
    if conditioning == "interior":
        # Both features vanish at s = 1, so the full-strength slider (and the range it spans) stays Stage 1's.
        return torch.stack([one - strength, strength * (one - strength)], 1)
    tau = step_fraction.to(strength).expand_as(strength)
    return torch.stack([one, strength, tau, strength * tau], 1)


class GainSchedule(nn.Module):
    """Stage 2's scale layers: multipliers ``1 + theta . phi(s, t)`` of every LoRA layer's Stage-1 gain.

    ``mean`` holds theta of every layer (flat, [D]); ``actions`` (rows [R, D], or None for ``mean``)
    is what the hook applies while set, so one generation batch can run a different theta per sample.
    ``attach(unet)`` installs a forward pre-hook that, at every UNet call, reads the layers' strength
    (set by ``set_strength``) and the timestep and sets each scale layer's ``modulation``.

    Args:
        channels: output channels of each LoRA layer's scale layer, by layer name (UNet order).
        conditioning: ``none`` (one multiplier per layer/channel), ``strength`` (linear in s),
            ``strength_step`` (bilinear in s and t / T) or ``interior`` (``1 + (1 - s)(a + b s)``: 1 at
            s = 1, so it reshapes only the strengths between 0 and 1 and keeps the slider's range).
        per_channel: one multiplier per output channel (else one per layer).
        num_train_timesteps: T, to turn timesteps into step fractions.
        shared: one multiplier for every layer (theta has just the features' K coefficients): it
            reshapes the slider's strength curve as a whole, a policy small enough for PPO to fit
            from a few rollouts per step, where one per layer spreads the same signal over K x layers.
    """

    def __init__(self, channels: dict[str, int], conditioning: Conditioning = "strength", per_channel: bool = False,
                 num_train_timesteps: int = 1000, shared: bool = False) -> None:
        super().__init__()
        if conditioning not in FEATURES:
            raise ValueError(f"conditioning must be one of {sorted(FEATURES)}, got {conditioning!r}")
        if shared and per_channel:
            raise ValueError("a gain schedule is either shared by all layers or per channel, not both")
        self.conditioning = conditioning
        self.per_channel = per_channel
        self.num_train_timesteps = num_train_timesteps
        self.shared = shared
        self.widths = {name: c if per_channel else 1 for name, c in channels.items()}
        coefficients = 1 if shared else sum(self.widths.values())
        self.mean = nn.Parameter(torch.zeros(FEATURES[conditioning] * coefficients))
        self.actions: Tensor | None = None

    @property
    def settings(self) -> dict:
        return {"conditioning": self.conditioning, "per_channel": self.per_channel, "num_train_timesteps": self.num_train_timesteps,
                "shared": self.shared}

    def multipliers(self, theta: Tensor, strength: Tensor, step_fraction: Tensor) -> dict[str, Tensor]:
        """Per layer, multipliers [R] (or [R, C] per channel) for theta [R or 1, D] and strengths [R or 1]."""
        features = schedule_features(self.conditioning, strength, step_fraction)[:, :, None]  # [R, K, 1]
        if self.shared:
            multiplier = 1 + (features[:, :, 0] * theta).sum(1)
            return {name: multiplier for name in self.widths}
        result, offset = {}, 0
        for name, width in self.widths.items():
            size = features.shape[1] * width
            coefficients = theta[:, offset : offset + size].view(theta.shape[0], -1, width)  # [R, K, C]
            offset += size
            multiplier = 1 + (features * coefficients).sum(1)
            result[name] = multiplier if self.per_channel else multiplier[:, 0]
        return result

    def attach(self, unet: nn.Module) -> torch.utils.hooks.RemovableHandle:
        layers = scale_layers(unet)
        if {name: layer.gain.numel() if self.per_channel else 1 for name, layer in layers.items()} != self.widths:
            raise LoRAError("the gain schedule does not fit this UNet's LoRA layers")

        def hook(module, args, kwargs):
            timestep = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).float().flatten()
            if timestep.numel() > 1 and (timestep != timestep[0]).any():
                raise LoRAError("the gain schedule needs one timestep per UNet call")
            strength = next(iter(layers.values())).strength  # set_strength sets the same on every layer
            strength = torch.as_tensor(strength, dtype=torch.float32, device=self.mean.device).flatten()
            theta = self.mean[None] if self.actions is None else self.actions
            with torch.no_grad():
                multipliers = self.multipliers(theta.detach(), strength, timestep[0] / self.num_train_timesteps)
            for name, layer in layers.items():
                layer.modulation = multipliers[name]

        return unet.register_forward_pre_hook(hook, with_kwargs=True)


def save_gain_schedule(schedule: GainSchedule, directory: str | Path) -> Path:
    """Write ``schedule`` to ``directory``/gain_schedule.safetensors (atomically); returns the file."""
    path = Path(directory) / GAIN_SCHEDULE
    tensors = {"mean": schedule.mean.detach().float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"rlmusic_pl": json.dumps(schedule.settings)}))
    return path


def load_gain_schedule(unet: nn.Module, directory: str | Path) -> GainSchedule | None:
    """Attach the Stage-2 gain schedule saved in an adapter directory to ``unet`` (which holds that
    adapter's LoRA); None if the directory has none (a Stage-1 slider or DDPO LoRA)."""
    path = Path(directory) / GAIN_SCHEDULE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            settings = json.loads((handle.metadata() or {})["rlmusic_pl"])
            mean = handle.get_tensor("mean")
    except Exception as err:  # safetensors, json and a missing key raise their own error types
        raise LoRAError(f"{path}: not a readable gain schedule ({err})") from err
    try:
        return attach_fixed_schedule(unet, mean, **settings)
    except TypeError as err:
        raise LoRAError(f"{path}: gain schedule settings {settings} do not fit this version ({err})") from err
    except LoRAError as err:
        raise LoRAError(f"{path}: {err}") from err


def lora_channels(unet: nn.Module) -> dict[str, int]:
    """Output channels of every LoRA scale layer of ``unet``, by layer name (what ``GainSchedule`` is built for)."""
    return {name: layer.gain.numel() for name, layer in scale_layers(unet).items()}


def attach_fixed_schedule(unet: nn.Module, mean: Tensor, **settings) -> GainSchedule:
    """A frozen ``GainSchedule(**settings)`` with coefficients ``mean``, attached to ``unet`` (which holds the
    LoRA); LoRAError if ``mean`` does not fit its LoRA layers."""
    schedule = GainSchedule(lora_channels(unet), **settings).to(unet.device)
    if schedule.mean.shape != mean.shape:
        raise LoRAError(f"holds {mean.numel()} coefficients, but the adapter's LoRA layers need {schedule.mean.numel()}")
    schedule.mean.data.copy_(mean)
    schedule.requires_grad_(False)
    schedule.attach(unet)
    return schedule
