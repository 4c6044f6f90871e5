"""``python -m rlmusic_pl {fit,validate,test,predict}``: a LightningCLI over the library's modules.

The model and the data module are chosen by ``class_path`` in the YAML config (subclass mode),
e.g. ``model: {class_path: rlmusic_pl.modules.DDPOModule, init_args: {...}}``.

Data commands run before the LightningCLI (``--help`` on each describes it):
``python -m rlmusic_pl prepare SOURCE OUT`` (audio folder -> log-mel features + manifest) and
``python -m rlmusic_pl synthesize OUT`` (synthetic bright/dull contrasting sets) and
``python -m rlmusic_pl make-preferences OUT`` (a synthetic preference set labelled by a judge reward).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

import rlmusic_pl
from rlmusic_pl import preference_sets
from rlmusic_pl.data import prepare, synthetic
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.modules.base import check_checkpoint_class

DATA_COMMANDS = {"prepare": prepare.main, "synthesize": synthetic.main, "make-preferences": preference_sets.main}
PACKAGE_DIR = Path(rlmusic_pl.__file__).resolve().parent
# What loggers and LightningCLI write into a run directory before the first step.
SETUP_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.")


DESCRIPTION = (
    "rlmusic_pl: DDPO, concept-slider (Stage 1) and PPO scale-layer (Stage 2) training of AudioLDM2, preference "
    "reward models (PreferenceRewardModule), and attribute-strength sweeps (predict). Give a config: python -m rlmusic_pl fit --config configs/tiny/ddpo_clap.yaml. "
    "Data commands: python -m rlmusic_pl prepare --help (audio folder -> log-mel features), "
    "python -m rlmusic_pl synthesize --help (synthetic contrasting sets), "
    "python -m rlmusic_pl make-preferences --help (a synthetic preference set labelled by a judge reward)."
)


class RLMusicCLI(LightningCLI):
    """LightningCLI with the library's defaults: any LightningModule / LightningDataModule by class path.

    It differs from LightningCLI in three ways:

    - **Resuming** (``--ckpt_path``): a checkpoint saved by another module class is refused before
      anything is built or written, naming both classes (LightningCLI would silently build the
      checkpoint's class, with its ``export_to``). The checkpoint's hyperparameters replace the config
      file's, as in LightningCLI, because the model must be rebuilt as it was trained (e.g. with the
      LoRA rank a command-line override gave the first run); a warning names every value they change.
      Arguments given on the command line of *this* run (``--model.learning_rate=1e-4``) are kept
      instead (LightningCLI drops them silently): the user typed them to change the resumed run, e.g.
      to continue at a lower learning rate (the optimizer takes its settings from the module's
      arguments, see ``BackboneModule.use_configured_optimizer_settings``).
    - **Bad input found while building the classes** (an unreadable adapter file, a value out of range)
      is printed as one line, ``error: <the library's message>``, exit status 2, instead of jsonargparse's
      "Does not validate against any of the Union subtypes" and a dump of the whole config.
    - **A run that fails before its first batch** leaves no ``lightning_logs/version_N`` behind: the
      version directory it created (holding only the saved config and empty logs) is removed.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-running into a run directory must not fail
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    # ------------------------------------------------------------------------ resuming
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._model_before_checkpoint = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        model = self.config[subcommand].get("model") if subcommand else None
        if not ckpt_path or model is None or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        try:
            check_checkpoint_class(checkpoint, model.class_path, ckpt_path)
        except RLMusicError as err:
            exit_with_error(err)
        # LightningCLI now replaces the model's arguments by the checkpoint's hyperparameters.
        self._model_before_checkpoint = copy.deepcopy(model)
        self._command_line_model_arguments = command_line_model_arguments(sys.argv[1:] if args is None else args)

    def before_instantiate_classes(self) -> None:
        before = self._model_before_checkpoint
        if before is None:
            return
        init_args = self.config[self.subcommand].model.init_args
        replaced = []
        for name in sorted(before.init_args.keys()):
            if "." in name or init_args.get(name) == before.init_args[name]:
                continue
            if name in self._command_line_model_arguments:
                init_args[name] = before.init_args[name]
            else:
                replaced.append(f"{name}={before.init_args[name]!r} -> {init_args.get(name)!r}")
        if replaced:
            rank_zero_warn(f"resuming from {self.config[self.subcommand].ckpt_path}: its hyperparameters replace the config's "
                           f"{', '.join(replaced)} (give --model.NAME=VALUE to override one)")

    # ------------------------------------------------------------------------ bad input
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            reported = input_error(err)
            if reported is None:
                raise
            exit_with_error(reported)

    # ------------------------------------------------------------------------ failed runs
    def _run_subcommand(self, subcommand: str) -> None:
        progress = FirstBatch()
        self.trainer.callbacks.append(progress)
        run_directories = NewRunDirectories(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if not progress.started and self.trainer.is_global_zero:
                run_directories.remove()
            raise


def command_line_model_arguments(args) -> set[str]:
    """Names of the model arguments set on the command line (``--model.NAME=V``, ``--model.init_args.NAME V``)."""
    if not isinstance(args, (list, tuple)):  # a dict or Namespace of arguments is a config, not a command line
        return set()
    names = set()
    for token in args:
        if isinstance(token, str) and token.startswith("--model."):
            path = token.removeprefix("--model.").split("=", 1)[0].removeprefix("init_args.")
            names.add(path.split(".")[0])
    return names


def input_error(err: BaseException) -> Exception | None:
    """The error in ``err``'s chain that refuses bad input: a library error, or a ValueError raised by the library's code.

    jsonargparse wraps what a class's ``__init__`` raised in its own errors; this finds it again.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RLMusicError) or (isinstance(err, ValueError) and raised_by_library(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def raised_by_library(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def exit_with_error(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


class FirstBatch(Callback):
    """Records whether the run's first batch (training, validation, testing or prediction) has started."""

    started = False

    def on_train_batch_start(self, *args) -> None:
        self.started = True

    def on_validation_batch_start(self, trainer, *args) -> None:
        self.started = self.started or not trainer.sanity_checking

    def on_test_batch_start(self, *args) -> None:
        self.started = True

    def on_predict_batch_start(self, *args) -> None:
        self.started = True


class NewRunDirectories:
    """The loggers' version directories a run creates, to remove them if it fails before its first batch.

    Taken before the run: what each logger's root directory (``<default_root_dir>/lightning_logs``)
    already holds. A version directory that was there before, or that holds anything but the files
    written at setup, is never removed.
    """

    def __init__(self, trainer) -> None:
        self.loggers = [logger for logger in trainer.loggers if hasattr(logger, "root_dir") and hasattr(logger, "log_dir")]
        self.before = {id(logger): existing(root_dir(logger)) for logger in self.loggers}

    def remove(self) -> None:
        for logger in self.loggers:
            root, (ancestor, entries) = root_dir(logger), self.before[id(logger)]
            run_dir = Path(logger.log_dir)
            if run_dir.parent != root or run_dir.name in entries or not run_dir.is_dir():
                continue
            if all(path.is_file() and path.name.startswith(SETUP_FILES) for path in run_dir.iterdir()):
                shutil.rmtree(run_dir)
                remove_empty_parents(run_dir.parent, ancestor)


def root_dir(logger) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(logger.root_dir)))  # as the loggers expand their log_dir


def existing(root: Path) -> tuple[Path, set[str]]:
    """The nearest existing directory at or above ``root``, and the entries of ``root`` (none if it does not exist)."""
    ancestor = root
    while not ancestor.is_dir() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor, set(os.listdir(root)) if ancestor == root else set()


def remove_empty_parents(directory: Path, keep: Path) -> None:
    """Remove ``directory`` and its parents below ``keep`` while they are empty."""
    while directory != keep and keep in directory.parents and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m rlmusic_pl`` and the ``rlmusic-pl`` script."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in DATA_COMMANDS:
        sys.exit(DATA_COMMANDS[argv[0]](argv[1:]))
    torch.set_float32_matmul_precision("high")
    RLMusicCLI(args=args)
