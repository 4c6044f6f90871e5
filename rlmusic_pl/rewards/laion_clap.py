"""Load a laion-clap ``.pt`` checkpoint (e.g. ``music_audioset_epoch_15_esc_90.14.pt``) into ``transformers.ClapModel``.

laion-clap names its towers ``text_branch`` (a RoBERTa, already in transformers' layout) and
``audio_branch`` (HTSAT, a Swin transformer with fused qkv and timm-style names); transformers
splits qkv and renames the Swin parts. The original package cannot be a dependency (see DESIGN.md
section 1), so the key mapping of transformers' ``convert_clap_original_pytorch_to_hf.py`` is
re-implemented here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import ClapModel

# Parts of a laion-clap model that transformers' ClapModel does not have: HTSAT's own STFT and
# mel front end (ClapFeatureExtractor does that), its classification heads, the shifted-window
# attention masks (recomputed on the fly), and the MLPs used only by laion's training loss.
_UNUSED_KEYS = re.compile(
    r"^audio_branch\.(spectrogram_extractor|logmel_extractor|head|tscam_conv)\."
    r"|^(text_transform|audio_transform)\."
    r"|\.attn_mask$"
)

# Substring renames inside the audio tower, in order (``attn.proj`` before the bare ``attn``).
_AUDIO_RENAMES = (
    (".attn.proj.", ".attention.output.dense."),
    (".attn.", ".attention.self."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
)

_PREFIX_RENAMES = (
    ("text_branch.", "text_model."),
    ("audio_branch.bn0.", "audio_model.audio_encoder.batch_norm."),
    ("audio_branch.", "audio_model.audio_encoder."),
)

# Buffers ClapModel rebuilds deterministically; checkpoints from other library versions may lack them.
_DERIVED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", "relative_position_index")

_PROJECTION = re.compile(r"^(text|audio)_projection\.(0|2)\.")


def laion_key_to_transformers(key: str) -> str:
    """The transformers ClapModel name of one laion-clap parameter (``module.`` prefix already removed)."""
    for old, new in _PREFIX_RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith("audio_model."):
        for old, new in _AUDIO_RENAMES:
            key = key.replace(old, new)
    # laion's projections are nn.Sequential(Linear, ReLU, Linear): indices 0 and 2.
    return _PROJECTION.sub(lambda m: f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.", key)


def convert_laion_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a laion-clap state dict to ClapModel's names, splitting fused qkv and dropping unused parts."""
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if _UNUSED_KEYS.search(key):
            continue
        key = laion_key_to_transformers(key)
        if ".attention.self.qkv." in key:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                converted[key.replace(".qkv.", f".{part}.")] = chunk
        else:
            converted[key] = value
    return converted


def read_laion_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The raw state dict of a laion-clap ``.pt`` file (its ``state_dict`` entry, or the file itself)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLAP checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises UnpicklingError, KeyError, RuntimeError... for non-checkpoints
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise ValueError(
                f"CLAP checkpoint {path}: holds a {unsafe.group(1)} object, which is not unpickled for safety. "
                "If you trust the file, re-save only its weights: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
            ) from err
        raise ValueError(f"CLAP checkpoint {path}: not a readable PyTorch file ({type(err).__name__})") from err
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"CLAP checkpoint {path}: expected a state dict (or a dict with a 'state_dict' entry) of tensors")
    return state_dict


def load_laion_checkpoint(model: ClapModel, path: str | os.PathLike) -> None:
    """Load a laion-clap checkpoint into ``model``, failing on any missing, unexpected or mis-shaped weight."""
    state_dict = convert_laion_state_dict(read_laion_checkpoint(path))
    expected = model.state_dict()
    missing = sorted(k for k in expected.keys() - state_dict.keys() if not k.endswith(_DERIVED_BUFFERS))
    unexpected = sorted(state_dict.keys() - expected.keys())
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"CLAP checkpoint {path} does not fit the architecture of the `model` config:\n"
            f"  missing: {_listing(missing)}\n  unexpected: {_listing(unexpected)}\n  wrong shape: {_listing(mis_shaped)}"
        )
    model.load_state_dict(state_dict, strict=False)


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown if len(names) <= limit else f"{shown} ... ({len(names)} in all)"
