"""``python -m rlmusic_pl {fit,validate,test,predict}``: a LightningCLI over the library's modules.

The model and the data module are chosen by ``class_path`` in the YAML config (subclass mode),
e.g. ``model: {class_path: rlmusic_pl.modules.DDPOModule, init_args: {...}}``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class RLMusicCLI(LightningCLI):
    """LightningCLI with the library's defaults: any LightningModule / LightningDataModule by class path."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-running into a run directory must not fail
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m rlmusic_pl`` and the ``rlmusic-pl`` script."""
    torch.set_float32_matmul_precision("high")
    RLMusicCLI(args=args)
