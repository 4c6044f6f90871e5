"""Stage 2's gain schedule: multipliers of every LoRA scale layer's gain as a function of strength and step (DESIGN.md §7).

RLScale-LoRA's Stage 2 trains the scale layers (``rlmusic_pl.lora.ScaleLayer``) so that intermediate
strengths move smoothly. A ``GainSchedule`` holds, per LoRA layer (optionally per channel), the
coefficients theta of a multiplier ``m = 1 + theta . phi(s, t[, q])`` of the Stage-1 gain, with
features ``phi`` of the strength s, the diffusion step t and, for a clip-aware schedule, a standardised
value q read off the clip's plain-slider outputs (``conditioning``); ``power_position`` instead sets the
strength itself to ``|s|**exp(theta . phi)``. theta = 0 is the Stage-1 slider exactly. A
forward pre-hook on the UNet sets every scale layer's ``modulation`` at each call; ``actions`` lets one
batch run a different theta per sample (PPO's rollouts) and ``context`` gives each sample its q.

File format (unchanged since the first Stage-2 adapters): ``gain_schedule.safetensors`` in the
adapter directory, one tensor ``mean`` (theta, flat [D], float32) and metadata ``rlmusic_pl``: the
JSON of ``GainSchedule.settings`` (``conditioning``, ``per_channel``, ``num_train_timesteps``, and since
``shared`` was added, ``shared``; files without it load as per-layer schedules).
``load_gain_schedule`` (used by ``SweepModule`` and the benchmarks) attaches it to a UNet that
holds the adapter's LoRA. A schedule that depends on the clip (``power_position``) also saves what it
measures of the clip and how it standardises it (``context_attribute``, ``context_center``,
``context_scale``); generate with it through ``rlmusic_pl.modules.slider.generate_with_schedule``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rlmusic_pl.data.audio import atomic_write
from rlmusic_pl.lora import LoRAError, scale_layers

GAIN_SCHEDULE = "gain_schedule.safetensors"
Conditioning = Literal["none", "strength", "strength_step", "interior", "power_position"]
FEATURES = {"none": 1, "strength": 2, "strength_step": 4, "interior": 2, "power_position": 3}
CLIP_CONDITIONINGS = ("power_position",)  # these also depend on the clip, read off its plain-slider outputs
ClipAttribute = Literal["centroid", "probe"]
MAX_LOG_EXPONENT = 3.0  # power_position's exponents stay within e**-3 .. e**3, so no multiplier overflows


def midpoint_log_exponent(at_zero: Tensor, at_half: Tensor, at_full: Tensor) -> Tensor:
    """log gamma per clip [B]: the clip's plain-slider attribute at s = 0, 1/2 and 1, read as a power curve
    ``a(s) = a(0) + (a(1) - a(0)) s**gamma`` through its midpoint (gamma > 1: the clip moves late, < 1: early).
    The midpoint's position is clipped to [0.02, 0.98], so a clip the slider does not move gets a finite value."""
    position = ((at_half - at_zero) / (at_full - at_zero)).nan_to_num(0.5, posinf=0.98, neginf=0.02).clamp(0.02, 0.98)
    return (position.log() / math.log(0.5)).log()


def strength_sides(strengths: list[float]) -> list[float]:
    """+1.0 and/or -1.0: the sides of s = 0 that ``strengths`` reach."""
    return sorted({math.copysign(1.0, s) for s in strengths if s != 0}, reverse=True)


def schedule_features(conditioning: str, strength: Tensor, step_fraction: Tensor, context: Tensor | None = None) -> Tensor:
    """Features [R, K] of per-sample strengths [R] at the step fraction t / T (a scalar tensor); ``context``
    [R] is each sample's standardised clip value q (clip-aware schedules)."""
    if conditioning in CLIP_CONDITIONINGS:
        if context is None:
            raise LoRAError(f"a {conditioning!r} gain schedule needs each clip's q (read off its plain-slider outputs): generate with generate_with_schedule")
        if context.numel() not in (1, strength.numel()) and strength.numel() != 1:
            raise LoRAError(f"{context.numel()} clip values do not fit {strength.numel()} per-sample strengths")
        strength, context = torch.broadcast_tensors(strength, context.to(strength))
        return torch.stack([torch.ones_like(strength), strength.abs(), context], 1)  # power_position's exponent
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
    (set by ``set_strength``), the timestep and ``context`` (q per sample, clip-aware schedules) and
    sets each scale layer's ``modulation``.

    Args:
        channels: output channels of each LoRA layer's scale layer, by layer name (UNet order).
        conditioning: ``none`` (one multiplier per layer/channel), ``strength`` (linear in s),
            ``strength_step`` (bilinear in s and t / T), ``interior`` (``1 + (1 - s)(a + b s)``: 1 at
            s = 1, so it reshapes only the strengths between 0 and 1 and keeps the slider's range) or
            ``power_position`` (the slider runs at strength ``|s|**exp(a + b |s| + c q)``, q the clip's standardised
            ``midpoint_log_exponent``: where its plain output at s = 1/2 lies between s = 0 and s = 1, so a clip that
            moves late is pushed on early and one that moves early held back; s = 0 and +-1 stay Stage 1's).
        per_channel: one multiplier per output channel (else one per layer).
        num_train_timesteps: T, to turn timesteps into step fractions.
        shared: one multiplier for every layer (theta has just the features' K coefficients): it
            reshapes the slider's strength curve as a whole, a policy small enough for PPO to fit
            from a few rollouts per step, where one per layer spreads the same signal over K x layers.
        context_attribute: what a clip-aware schedule measures of a clip's plain-slider outputs:
            ``centroid`` (the decoded audio's spectral centroid) or ``probe`` (the slider's latent probe).
        context_center, context_scale: q = (raw value - center) / scale; ``observe_context`` keeps them
            at the running mean and std of the raw values it is shown (Stage 2's rollouts).
    """

    def __init__(self, channels: dict[str, int], conditioning: Conditioning = "strength", per_channel: bool = False,
                 num_train_timesteps: int = 1000, shared: bool = False, context_attribute: ClipAttribute | None = None,
                 context_center: float = 0.0, context_scale: float = 1.0) -> None:
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
        self.context: Tensor | None = None
        self.context_attribute = context_attribute
        if self.needs_context:
            if context_attribute not in ("centroid", "probe"):
                raise ValueError(f"a {conditioning!r} schedule needs context_attribute 'centroid' or 'probe', got {context_attribute!r}")
            if not context_scale > 0:
                raise ValueError(f"context_scale must be > 0, got {context_scale}")
            # Only clip-aware schedules hold these, so older checkpoints and files load unchanged.
            self.register_buffer("context_norm", torch.tensor([float(context_center), float(context_scale)]))
            self.register_buffer("context_moments", torch.zeros(3, dtype=torch.float64))  # count, mean, sum of squared deviations

    @property
    def needs_context(self) -> bool:
        """Whether the multipliers also depend on the clip (``set_context`` before each generation)."""
        return self.conditioning in CLIP_CONDITIONINGS

    def observe_context(self, attribute: Tensor) -> None:
        """Fold raw clip values [N] (``clip_values``) into the running mean and std that standardise q (Chan's parallel update)."""
        values = attribute.detach().double().flatten().to(self.context_moments.device)
        if values.numel() == 0 or not torch.isfinite(values).all():
            raise ValueError(f"the clips' values (attributes of their plain-slider outputs) must be finite numbers, got {values.tolist()}")
        count, mean, squares = self.context_moments.unbind()
        batch_count, batch_mean = values.numel(), values.mean()
        total = count + batch_count
        delta = batch_mean - mean
        squares = squares + (values - batch_mean).pow(2).sum() + delta.pow(2) * count * batch_count / total
        mean = mean + delta * batch_count / total
        self.context_moments.copy_(torch.stack([total, mean, squares]))
        if total >= 2 and squares > 0:
            self.context_norm.copy_(torch.stack([mean, (squares / total).sqrt()]).float())

    def set_context(self, attribute: Tensor | None) -> None:
        """Each sample's q [R] from its clip's raw value [R] (``clip_values``; None: clear it)."""
        self.context = None if attribute is None else (attribute.float().to(self.context_norm.device) - self.context_norm[0]) / self.context_norm[1]

    @property
    def settings(self) -> dict:
        settings = {"conditioning": self.conditioning, "per_channel": self.per_channel, "num_train_timesteps": self.num_train_timesteps,
                    "shared": self.shared}
        if self.needs_context:
            center, scale = self.context_norm.tolist()
            settings.update(context_attribute=self.context_attribute, context_center=center, context_scale=scale)
        return settings

    def multipliers(self, theta: Tensor, strength: Tensor, step_fraction: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """Per layer, multipliers [R] (or [R, C] per channel) for theta [R or 1, D], strengths [R or 1] and q [R] (clip-aware schedules)."""
        features = schedule_features(self.conditioning, strength, step_fraction, context)[:, :, None]  # [R, K, 1]
        magnitude = strength.abs().float().expand(features.shape[0])[:, None]  # [R, 1]
        if self.shared:
            multiplier = self.multiplier_of((features[:, :, 0] * theta).sum(1)[:, None], magnitude)[:, 0]
            return {name: multiplier for name in self.widths}
        result, offset = {}, 0
        for name, width in self.widths.items():
            size = features.shape[1] * width
            coefficients = theta[:, offset : offset + size].view(theta.shape[0], -1, width)  # [R, K, C]
            offset += size
            multiplier = self.multiplier_of((features * coefficients).sum(1), magnitude)
            result[name] = multiplier if self.per_channel else multiplier[:, 0]
        return result

    def multiplier_of(self, value: Tensor, magnitude: Tensor) -> Tensor:
        """The gain multiplier for ``theta . phi`` [R, C] at strengths of magnitude |s| [R, 1]: ``1 + theta . phi``, or for
        ``power_position`` ``|s|**(exp(theta . phi) - 1)``, so that the slider runs at strength ``|s|**exp(theta . phi)``
        (1 at s = 0, where the LoRA is off anyway)."""
        if self.conditioning != "power_position":
            return 1 + value
        exponent = value.clamp(-MAX_LOG_EXPONENT, MAX_LOG_EXPONENT).exp() - 1
        power = magnitude.clamp_min(torch.finfo(torch.float32).tiny).pow(exponent)
        return torch.where(magnitude > 0, power, torch.ones_like(power))

    def pilot_strengths(self, strengths: list[float]) -> list[float]:
        """The strengths at which a clip-aware schedule reads each clip off the plain slider, before generating
        ``strengths`` with it: 0, and 1/2 and 1 on each side of 0 that ``strengths`` reach."""
        return [0.0] + [side * at for side in strength_sides(strengths) for at in (0.5, 1.0)]

    def clip_values(self, strengths: list[float], attributes: Tensor) -> dict[float, Tensor]:
        """Each clip's raw q [B] for each side of s = 0 (+1.0, -1.0) that ``strengths`` reach, from its attributes
        [P, B] at ``pilot_strengths(strengths)``: the log exponent of its plain sweep on that side (``midpoint_log_exponent``)."""
        at = dict(zip(self.pilot_strengths(strengths), attributes))
        return {side: midpoint_log_exponent(at[0.0], at[side * 0.5], at[side]) for side in strength_sides(strengths)}

    def keeps(self, strength: float) -> bool:
        """Whether the multiplier is 1 at ``strength`` whatever theta and q (so a pilot there is the final output)."""
        return strength == 0 or (self.conditioning == "power_position" and abs(strength) == 1)

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
                multipliers = self.multipliers(theta.detach(), strength, timestep[0] / self.num_train_timesteps, self.context)
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
    except (TypeError, ValueError) as err:
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
