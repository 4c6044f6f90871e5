"""``python -m rlmusic_pl {fit,validate,test,predict}``: a LightningCLI over the library's modules.

The model and the data module are chosen by ``class_path`` in the YAML config (subclass mode),
e.g. ``model: {class_path: rlmusic_pl.modules.DDPOModule, init_args: {...}}``.

Data commands run before the LightningCLI (``--help`` on each describes it):
``python -m rlmusic_pl prepare SOURCE OUT`` (audio folder -> log-mel features + manifest) and
``python -m rlmusic_pl synthesize OUT`` (synthetic bright/dull contrasting sets).
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from rlmusic_pl.data import prepare, synthetic

DATA_COMMANDS = {"prepare": prepare.main, "synthesize": synthetic.main}


DESCRIPTION = (
    "rlmusic_pl: DDPO, concept-slider (Stage 1) and PPO scale-layer (Stage 2) training of AudioLDM2, and "
    "attribute-strength sweeps (predict). Give a config: python -m rlmusic_pl fit --config configs/tiny/ddpo_clap.yaml. "
    "Data commands: python -m rlmusic_pl prepare --help (audio folder -> log-mel features), "
    "python -m rlmusic_pl synthesize --help (synthetic contrasting sets)."
)


class RLMusicCLI(LightningCLI):
    """LightningCLI with the library's defaults: any LightningModule / LightningDataModule by class path."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-running into a run directory must not fail
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m rlmusic_pl`` and the ``rlmusic-pl`` script."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in DATA_COMMANDS:
        sys.exit(DATA_COMMANDS[argv[0]](argv[1:]))
    torch.set_float32_matmul_precision("high")
    RLMusicCLI(args=args)
