"""peft LoRA on the AudioLDM2 UNet, with a signed strength and per-channel scale layers.

Every LoRA layer's update is multiplied by ``g = s * w``: ``s`` is the signed slider strength
(set at run time, negative included) and ``w`` a per-output-channel gain (RLScale-LoRA's "scale
layer"), initialised to ones. Stage 1 and DDPO train the LoRA A/B weights with ``w`` frozen; Stage 2
trains only ``w``. The gain is applied by a forward hook on ``lora_B``, so peft's own layers,
saving and loading are used unchanged.

Adapters are saved in diffusers' format (``pytorch_lora_weights.safetensors``, keys ``unet.*``,
the LoRA configuration as adapter metadata) and the scale layers in ``scale_layers.safetensors``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlmusic_pl.data.audio import atomic_directory_write
from rlmusic_pl.errors import RLMusicError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SCALE_WEIGHTS = "scale_layers.safetensors"
ADAPTER = "default"

ATTENTION_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0)"
TARGET_PRESETS = {
    # Sliders' "noxattn": self-attention only, so the text pathway is left alone.
    "self_attention": rf".*attn1\.{ATTENTION_PROJECTIONS}",
    "attention": rf".*attn[12]\.{ATTENTION_PROJECTIONS}",
    "self_attention+conv": rf"(.*attn1\.{ATTENTION_PROJECTIONS}|.*resnets\.\d+\.conv[12])",
    "attention+conv": rf"(.*attn[12]\.{ATTENTION_PROJECTIONS}|.*resnets\.\d+\.conv[12])",
}


class LoRAError(RLMusicError, ValueError):
    """A LoRA adapter could not be built, saved or loaded; the message names the file or field."""


@dataclass
class LoRASettings:
    """Shape of the LoRA: rank, alpha and which UNet modules it adapts.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        targets: a preset (``attention``, ``self_attention``, ``attention+conv``,
            ``self_attention+conv``) or a regular expression over UNet module names.
        per_channel_scale: scale layers with one gain per output channel (else one per layer).
        init_seed: seed of the LoRA A weights' random initialisation (None: the global random state).
    """

    rank: int = 4
    alpha: float = 4.0
    targets: str = "attention"
    per_channel_scale: bool = True
    init_seed: int | None = field(default=None, compare=False)

    def target_pattern(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)


class ScaleLayer(nn.Module):
    """Multiplies a LoRA layer's update by ``strength * gain`` (gain per output channel or per layer).

    ``strength`` is a float, or a tensor [B] of one strength per sample, so one UNet call can run
    several strengths; it also applies, tiled, to a batch that repeats the B samples (the guided
    [negative, positive] batch). ``modulation`` (None, or a tensor [B] or [B, C], tiled the same way)
    further multiplies the factor per sample: Stage 2's gain schedule sets it at every UNet call.
    """

    def __init__(self, channels: int, per_channel: bool = True) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels if per_channel else 1), requires_grad=False)
        self.strength: float | Tensor = 1.0
        self.modulation: Tensor | None = None

    def factor(self, dim: int, batch: int) -> Tensor:
        # Linear outputs are [B, ..., C]; conv outputs are [B, C, H, W].
        gain = self.gain.view(-1, 1, 1) if dim == 4 else self.gain
        factor = gain * self.strength if not isinstance(self.strength, Tensor) else _per_sample(self.strength.to(gain.device), dim, batch) * gain
        if self.modulation is None:
            return factor
        return factor * _per_sample(self.modulation.to(gain.device), dim, batch)

    def hook(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return output * self.factor(output.dim(), output.shape[0]).to(output.dtype)


def _per_sample(values: Tensor, dim: int, batch: int) -> Tensor:
    """Per-sample values [B] or [B, C] tiled to ``batch`` rows and shaped to broadcast over an output of ``dim`` dims."""
    rows = values.shape[0]
    if batch % rows:
        raise LoRAError(f"{rows} per-sample LoRA strengths do not fit a batch of {batch}")
    values = values.repeat(batch // rows, *(1,) * (values.dim() - 1))
    if values.dim() == 1:
        return values.view(-1, *(1,) * (dim - 1))
    return values.view(batch, -1, 1, 1) if dim == 4 else values.view(batch, *(1,) * (dim - 2), -1)


def lora_layers(unet: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``unet`` by module name."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def scale_layers(unet: nn.Module) -> dict[str, ScaleLayer]:
    return {name: module.rl_scale for name, module in lora_layers(unet).items()}


def resolve_targets(unet: nn.Module, settings: LoRASettings) -> list[str]:
    """Full names of the UNet modules the settings select; a clear error if none match."""
    pattern = re.compile(settings.target_pattern())
    names = [name for name, module in unet.named_modules() if pattern.fullmatch(name) and isinstance(module, (nn.Linear, nn.Conv2d, LoraLayer))]
    if not names:
        raise LoRAError(f"lora targets {settings.targets!r} match no Linear/Conv2d module of the UNet")
    return names


def add_lora(unet: nn.Module, settings: LoRASettings) -> None:
    """Inject a LoRA adapter (fp32 A/B weights, trainable) and a frozen scale layer per LoRA layer."""
    if lora_layers(unet):
        raise LoRAError("the UNet already has a LoRA adapter")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=resolve_targets(unet, settings), init_lora_weights=True)
    with torch.random.fork_rng(devices=[], enabled=settings.init_seed is not None):
        if settings.init_seed is not None:
            torch.manual_seed(settings.init_seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for layer in lora_layers(unet).values():
        lora_b = layer.lora_B[ADAPTER]
        channels = lora_b.out_features if isinstance(lora_b, nn.Linear) else lora_b.out_channels
        layer.rl_scale = ScaleLayer(channels, settings.per_channel_scale).to(lora_b.weight.device)
        lora_b.register_forward_hook(layer.rl_scale.hook)
    for param in lora_parameters(unet):
        # fp16 trainable weights break GradScaler ("Attempting to unscale FP16 gradients").
        param.data = param.data.float()
        param.requires_grad_(True)
    unet._rl_lora_settings = settings


def lora_settings(unet: nn.Module) -> LoRASettings:
    settings = getattr(unet, "_rl_lora_settings", None)
    if settings is None:
        raise LoRAError("the UNet has no LoRA adapter (call add_lora first)")
    return settings


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B weights (what Stage 1 and DDPO train)."""
    return [p for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def scale_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The scale-layer gains (what Stage 2 trains)."""
    return [layer.gain for layer in scale_layers(unet).values()]


def set_strength(unet: nn.Module, strength: float | Tensor) -> None:
    """Set the signed LoRA strength of every layer (0 = the base model), or one per sample (a tensor [B])."""
    if isinstance(strength, Tensor) and strength.dim() != 1:
        raise LoRAError(f"per-sample LoRA strengths must be a tensor [batch], got shape {tuple(strength.shape)}")
    for layer in scale_layers(unet).values():
        layer.strength = strength.detach() if isinstance(strength, Tensor) else float(strength)


@contextmanager
def lora_strength(unet: nn.Module, strength: float | Tensor):
    """Temporarily set the LoRA strength (a float, or one per sample: a tensor [B])."""
    previous = {name: layer.strength for name, layer in scale_layers(unet).items()}
    set_strength(unet, strength)
    try:
        yield
    finally:
        for name, layer in scale_layers(unet).items():
            layer.strength = previous[name]


# --------------------------------------------------------------------------------- files
def save_lora(
    unet: nn.Module, directory: str | Path, extra_metadata: dict | None = None, extra_files: Callable[[Path], None] | None = None
) -> Path:
    """Save the adapter in diffusers' format plus the scale layers; returns the directory.

    ``extra_files(staging_dir)`` may add files (e.g. Stage 2's gain schedule) to the same atomic write.
    """
    directory = Path(directory)
    settings = lora_settings(unet)
    # peft also returns the scale layers (submodules of its layers): they go to their own file.
    weights = {
        k: v.detach().float().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()
        if ".lora_A." in k or ".lora_B." in k
    }
    metadata = {"r": settings.rank, "lora_alpha": settings.alpha, "target_modules": resolve_targets(unet, settings)}
    gains = {name: layer.gain.detach().float().cpu().contiguous() for name, layer in scale_layers(unet).items()}
    info = {"settings": asdict(settings), **(extra_metadata or {})}

    def write(tmp: Path) -> None:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=weights, unet_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS)
        save_file(gains, str(tmp / SCALE_WEIGHTS), metadata={"rlmusic_pl": json.dumps(info)})
        if extra_files is not None:
            extra_files(tmp)

    atomic_directory_write(directory, write)
    return directory


def read_adapter_info(directory: str | Path) -> dict:
    """The settings and extra metadata saved with an adapter directory."""
    return _file_metadata(_adapter_file(directory, SCALE_WEIGHTS), "rlmusic_pl")


def _file_metadata(path: Path, key: str) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(key, "{}"))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoRAError(f"{path}: not a readable safetensors file ({err})") from err


def _adapter_file(directory: str | Path, name: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise LoRAError(f"{directory}: no such adapter directory")
    path = directory / name
    if not path.is_file():
        raise LoRAError(f"{directory}: not a LoRA adapter directory (missing {name})")
    return path


def read_lora_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """The UNet LoRA weights of a diffusers LoRA file, with peft key names (no ``unet.`` prefix)."""
    path = _adapter_file(directory, LORA_WEIGHTS)
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise LoRAError(f"{path}: not a readable safetensors LoRA file ({err})") from err
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise LoRAError(f"{path}: holds no UNet LoRA weights (no 'unet.*' keys)")
    return unet_state


def load_lora(unet: nn.Module, directory: str | Path, settings: LoRASettings | None = None) -> LoRASettings:
    """Load a saved adapter into ``unet``: injects it (with the saved settings) if the UNet has none.

    With ``settings`` given, or a UNet that already has an adapter, a rank or target mismatch is a
    clear error rather than a silent partial load.
    """
    state = read_lora_state_dict(directory)
    info = read_adapter_info(directory) if (Path(directory) / SCALE_WEIGHTS).is_file() else {}
    saved = LoRASettings(**info["settings"]) if "settings" in info else _settings_from_weights(state, Path(directory) / LORA_WEIGHTS)
    wanted = settings or getattr(unet, "_rl_lora_settings", None) or saved
    _check_compatible(directory, saved, wanted)
    if not lora_layers(unet):
        add_lora(unet, wanted)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise LoRAError(f"{directory}: LoRA weights do not fit this UNet (missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})")
    if (Path(directory) / SCALE_WEIGHTS).is_file():
        _load_gains(unet, Path(directory) / SCALE_WEIGHTS)
    return wanted


def _settings_from_weights(state: dict[str, Tensor], path: Path) -> LoRASettings:
    rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    # diffusers stores the LoRA config (alpha included) as adapter metadata; files without it use alpha = rank.
    alpha = float(_file_metadata(path, "lora_adapter_metadata").get("unet.lora_alpha", rank))
    return LoRASettings(rank=rank, alpha=alpha, targets="(" + "|".join(re.escape(k.split(".lora_")[0]) for k in state if "lora_A" in k) + ")")


def _check_compatible(directory, saved: LoRASettings, wanted: LoRASettings) -> None:
    if saved.rank != wanted.rank or saved.target_pattern() != wanted.target_pattern():
        raise LoRAError(
            f"{directory}: adapter has rank {saved.rank} and targets {saved.targets!r}, "
            f"but rank {wanted.rank} and targets {wanted.targets!r} were asked for"
        )


def _load_gains(unet: nn.Module, path: Path) -> None:
    gains = load_file(str(path))
    layers = scale_layers(unet)
    if set(gains) != set(layers):
        raise LoRAError(f"{path}: scale layers do not match the UNet's LoRA layers")
    for name, layer in layers.items():
        if gains[name].shape != layer.gain.shape:
            raise LoRAError(f"{path}: scale layer {name} has shape {tuple(gains[name].shape)}, expected {tuple(layer.gain.shape)}")
        layer.gain.data.copy_(gains[name])


def copy_adapter(source: str | Path, destination: str | Path) -> None:
    """Copy an adapter directory's files (e.g. into ``checkpoints/``)."""
    atomic_directory_write(destination, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in Path(source).iterdir() if f.is_file()])
