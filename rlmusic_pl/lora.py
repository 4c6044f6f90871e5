"""peft LoRA on a backbone's network (the AudioLDM2 UNet, the MusicGen decoder), with a signed strength
and per-channel scale layers.

Every LoRA layer's update is multiplied by ``g = s * w``: ``s`` is the signed slider strength
(set at run time, negative included) and ``w`` a per-output-channel gain (RLScale-LoRA's "scale
layer"), initialised to ones. Stage 1 and DDPO train the LoRA A/B weights with ``w`` frozen; Stage 2
trains only ``w``. The gain is applied by a forward hook on ``lora_B``, so peft's own layers,
saving and loading are used unchanged.

Adapters are saved in one of two layouts, both with the scale layers and our settings in
``scale_layers.safetensors``:
  - ``diffusers`` (the UNet): ``pytorch_lora_weights.safetensors``, keys ``unet.*``, the LoRA
    configuration as adapter metadata;
  - ``peft`` (the MusicGen decoder): peft's own ``adapter_model.safetensors`` + ``adapter_config.json``,
    so that ``peft.PeftModel.from_pretrained(model.decoder, directory)`` loads it without this library
    (that gives strength 1 with the saved weights; the scale layers' gains are ours alone).
``load_lora`` reads either.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import CONFIG_NAME as PEFT_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import MusicgenForCausalLM

from rlmusic_pl.data.audio import atomic_directory_write
from rlmusic_pl.errors import RLMusicError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SCALE_WEIGHTS = "scale_layers.safetensors"
ADAPTER = "default"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names

ATTENTION_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0)"
TARGET_PRESETS = {
    # Sliders' "noxattn": self-attention only, so the text pathway is left alone.
    "self_attention": rf".*attn1\.{ATTENTION_PROJECTIONS}",
    "attention": rf".*attn[12]\.{ATTENTION_PROJECTIONS}",
    "self_attention+conv": rf"(.*attn1\.{ATTENTION_PROJECTIONS}|.*resnets\.\d+\.conv[12])",
    "attention+conv": rf"(.*attn[12]\.{ATTENTION_PROJECTIONS}|.*resnets\.\d+\.conv[12])",
}
DECODER_PROJECTIONS = r"(q_proj|k_proj|v_proj|out_proj)"
MUSICGEN_TARGET_PRESETS = {
    # self_attn reads the codes so far, encoder_attn the text; fc1/fc2 are each layer's FFN.
    "self_attention": rf".*self_attn\.{DECODER_PROJECTIONS}",
    "attention": rf".*(self_attn|encoder_attn)\.{DECODER_PROJECTIONS}",
    "self_attention+ffn": rf"(.*self_attn\.{DECODER_PROJECTIONS}|.*layers\.\d+\.fc[12])",
    "attention+ffn": rf"(.*(self_attn|encoder_attn)\.{DECODER_PROJECTIONS}|.*layers\.\d+\.fc[12])",
}
Layout = Literal["diffusers", "peft"]


class LoRAError(RLMusicError, ValueError):
    """A LoRA adapter could not be built, saved or loaded; the message names the file or field."""


def target_presets(model: nn.Module) -> dict[str, str]:
    """The preset target names for ``model``: the MusicGen decoder's, else the AudioLDM2 UNet's."""
    return MUSICGEN_TARGET_PRESETS if isinstance(model, MusicgenForCausalLM) else TARGET_PRESETS


@dataclass
class LoRASettings:
    """Shape of the LoRA: rank, alpha and which modules it adapts.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        targets: a preset or a regular expression over module names. AudioLDM2 UNet presets:
            ``attention``, ``self_attention``, ``attention+conv``, ``self_attention+conv``; MusicGen
            decoder presets: ``attention`` (self- and cross-attention projections), ``self_attention``,
            ``attention+ffn``, ``self_attention+ffn``.
        per_channel_scale: scale layers with one gain per output channel (else one per layer).
        init_seed: seed of the LoRA A weights' random initialisation (None: the global random state).
    """

    rank: int = 4
    alpha: float = 4.0
    targets: str = "attention"
    per_channel_scale: bool = True
    init_seed: int | None = field(default=None, compare=False)

    def target_pattern(self, presets: dict[str, str] = TARGET_PRESETS) -> str:
        """The regular expression of ``targets`` (a preset of ``presets`` or already a regex)."""
        return presets.get(self.targets, self.targets)


class ScaleLayer(nn.Module):
    """Multiplies a LoRA layer's update by ``strength * gain`` (gain per output channel or per layer).

    ``strength`` is a float, or a tensor [B] of one strength per sample, so one network call can run
    several strengths; it also applies, tiled, to a batch that repeats the B samples (the guided
    batch: [negative, positive] for AudioLDM2, [conditional, unconditional] for MusicGen).
    ``modulation`` (None, or a tensor [B] or [B, C], tiled the same way) further multiplies the
    factor per sample: Stage 2's gain schedule sets it at every UNet call.
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


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def scale_layers(model: nn.Module) -> dict[str, ScaleLayer]:
    return {name: module.rl_scale for name, module in lora_layers(model).items()}


def resolve_targets(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Full names of the modules of ``model`` the settings select; a clear error if none match."""
    pattern = re.compile(settings.target_pattern(target_presets(model)))
    names = [name for name, module in model.named_modules() if pattern.fullmatch(name) and isinstance(module, (nn.Linear, nn.Conv2d, LoraLayer))]
    if not names:
        raise LoRAError(f"lora targets {settings.targets!r} match no Linear/Conv2d module of the {type(model).__name__}")
    return names


def add_lora(model: nn.Module, settings: LoRASettings) -> None:
    """Inject a LoRA adapter (fp32 A/B weights, trainable) and a frozen scale layer per LoRA layer."""
    if lora_layers(model):
        raise LoRAError(f"the {type(model).__name__} already has a LoRA adapter")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=resolve_targets(model, settings), init_lora_weights=True)
    with torch.random.fork_rng(devices=[], enabled=settings.init_seed is not None):
        if settings.init_seed is not None:
            torch.manual_seed(settings.init_seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for layer in lora_layers(model).values():
        lora_b = layer.lora_B[ADAPTER]
        channels = lora_b.out_features if isinstance(lora_b, nn.Linear) else lora_b.out_channels
        layer.rl_scale = ScaleLayer(channels, settings.per_channel_scale).to(lora_b.weight.device)
        lora_b.register_forward_hook(layer.rl_scale.hook)
    for param in lora_parameters(model):
        # fp16 trainable weights break GradScaler ("Attempting to unscale FP16 gradients").
        param.data = param.data.float()
        param.requires_grad_(True)
    model._rl_lora_settings = settings


def lora_settings(model: nn.Module) -> LoRASettings:
    settings = getattr(model, "_rl_lora_settings", None)
    if settings is None:
        raise LoRAError(f"the {type(model).__name__} has no LoRA adapter (call add_lora first)")
    return settings


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B weights (what Stage 1, DDPO and MusicGen RL train)."""
    return [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scale-layer gains (what Stage 2 trains)."""
    return [layer.gain for layer in scale_layers(model).values()]


def set_strength(model: nn.Module, strength: float | Tensor) -> None:
    """Set the signed LoRA strength of every layer (0 = the base model), or one per sample (a tensor [B])."""
    if isinstance(strength, Tensor) and strength.dim() != 1:
        raise LoRAError(f"per-sample LoRA strengths must be a tensor [batch], got shape {tuple(strength.shape)}")
    for layer in scale_layers(model).values():
        layer.strength = strength.detach() if isinstance(strength, Tensor) else float(strength)


@contextmanager
def lora_strength(model: nn.Module, strength: float | Tensor):
    """Temporarily set the LoRA strength (a float, or one per sample: a tensor [B])."""
    previous = {name: layer.strength for name, layer in scale_layers(model).items()}
    set_strength(model, strength)
    try:
        yield
    finally:
        for name, layer in scale_layers(model).items():
            layer.strength = previous[name]


# --------------------------------------------------------------------------------- files
def save_lora(
    model: nn.Module,
    directory: str | Path,
    extra_metadata: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
    layout: Layout = "diffusers",
) -> Path:
    """Save the adapter (in the ``diffusers`` or ``peft`` layout) plus the scale layers; returns the directory.

    The whole directory is written atomically. ``extra_files(staging_dir)`` may add files (e.g.
    Stage 2's gain schedule) to the same write.
    """
    if layout not in ("diffusers", "peft"):
        raise LoRAError(f"unknown adapter layout {layout!r}: expected 'diffusers' or 'peft'")
    directory = Path(directory)
    settings = lora_settings(model)
    targets = resolve_targets(model, settings)
    # peft also returns the scale layers (submodules of its layers): they go to their own file.
    weights = {
        k: v.detach().float().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()
        if ".lora_A." in k or ".lora_B." in k
    }
    gains = {name: layer.gain.detach().float().cpu().contiguous() for name, layer in scale_layers(model).items()}
    info = {"settings": asdict(settings), **(extra_metadata or {})}

    def write(tmp: Path) -> None:
        if layout == "peft":
            save_file({PEFT_PREFIX + k: v for k, v in weights.items()}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
            LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets).save_pretrained(str(tmp))
        else:
            metadata = {"r": settings.rank, "lora_alpha": settings.alpha, "target_modules": targets}
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


def adapter_layout(directory: str | Path) -> Layout:
    """Which layout an adapter directory was saved in; a clear error if it is not an adapter."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoRAError(f"{directory}: no such adapter directory")
    if (directory / PEFT_WEIGHTS).is_file():
        return "peft"
    if (directory / LORA_WEIGHTS).is_file():
        return "diffusers"
    raise LoRAError(f"{directory}: not a LoRA adapter directory (missing {LORA_WEIGHTS} or peft's {PEFT_WEIGHTS})")


def _weights_file(directory: str | Path) -> tuple[Path, str]:
    """The adapter's weight file and the prefix its keys carry before peft's module names."""
    if adapter_layout(directory) == "peft":
        return Path(directory) / PEFT_WEIGHTS, PEFT_PREFIX
    return Path(directory) / LORA_WEIGHTS, "unet."


def read_lora_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """The LoRA weights of an adapter directory (either layout), with peft key names (no ``unet.`` or peft prefix)."""
    path, prefix = _weights_file(directory)
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise LoRAError(f"{path}: not a readable safetensors LoRA file ({err})") from err
    model_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not model_state:
        raise LoRAError(f"{path}: holds no LoRA weights of the model (no '{prefix}*' keys)")
    return model_state


def load_lora(model: nn.Module, directory: str | Path, settings: LoRASettings | None = None) -> LoRASettings:
    """Load a saved adapter (either layout) into ``model``: injects it (with the saved settings) if the model has none.

    With ``settings`` given, or a model that already has an adapter, a rank or target mismatch is a
    clear error rather than a silent partial load.
    """
    state = read_lora_state_dict(directory)
    info = read_adapter_info(directory) if (Path(directory) / SCALE_WEIGHTS).is_file() else {}
    saved = LoRASettings(**info["settings"]) if "settings" in info else _settings_from_weights(state, _saved_alpha(directory))
    wanted = settings or getattr(model, "_rl_lora_settings", None) or saved
    _check_compatible(directory, saved, wanted, target_presets(model))
    if not lora_layers(model):
        add_lora(model, wanted)
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise LoRAError(
            f"{directory}: LoRA weights do not fit this {type(model).__name__} (missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )
    if (Path(directory) / SCALE_WEIGHTS).is_file():
        _load_gains(model, Path(directory) / SCALE_WEIGHTS)
    return wanted


def _saved_alpha(directory: str | Path) -> float | None:
    """LoRA alpha as the adapter's own format records it: diffusers' adapter metadata or peft's config."""
    path, _ = _weights_file(directory)
    if path.name == LORA_WEIGHTS:
        return _file_metadata(path, "lora_adapter_metadata").get("unet.lora_alpha")
    config = Path(directory) / PEFT_CONFIG
    try:
        return json.loads(config.read_text())["lora_alpha"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoRAError(f"{config}: not a readable peft adapter config with 'lora_alpha' ({err})") from err


def _settings_from_weights(state: dict[str, Tensor], alpha: float | None) -> LoRASettings:
    rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    # Files that do not record alpha were made with alpha = rank.
    return LoRASettings(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        targets="(" + "|".join(re.escape(k.split(".lora_")[0]) for k in state if "lora_A" in k) + ")",
    )


def _check_compatible(directory, saved: LoRASettings, wanted: LoRASettings, presets: dict[str, str]) -> None:
    if saved.rank != wanted.rank or saved.target_pattern(presets) != wanted.target_pattern(presets):
        raise LoRAError(
            f"{directory}: adapter has rank {saved.rank} and targets {saved.targets!r}, "
            f"but rank {wanted.rank} and targets {wanted.targets!r} were asked for"
        )


def _load_gains(model: nn.Module, path: Path) -> None:
    gains = load_file(str(path))
    layers = scale_layers(model)
    if set(gains) != set(layers):
        raise LoRAError(f"{path}: scale layers do not match the {type(model).__name__}'s LoRA layers")
    for name, layer in layers.items():
        if gains[name].shape != layer.gain.shape:
            raise LoRAError(f"{path}: scale layer {name} has shape {tuple(gains[name].shape)}, expected {tuple(layer.gain.shape)}")
        layer.gain.data.copy_(gains[name])


def copy_adapter(source: str | Path, destination: str | Path) -> None:
    """Copy an adapter directory's files (e.g. into ``checkpoints/``)."""
    atomic_directory_write(destination, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in Path(source).iterdir() if f.is_file()])
