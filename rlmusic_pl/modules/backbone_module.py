"""What every LightningModule here shares, whatever its backbone: a frozen backbone in eval mode,
trainable adapters, lean checkpoints and adapter export.

``AudioLDM2Module`` (modules/base.py) and ``MusicGenModule`` (modules/musicgen.py) are the thin
backbone layers on top: they say how to load their backbone, which network carries the adapters,
and in which file layout the adapter is exported.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from lightning import LightningModule
from torch import nn

from rlmusic_pl.data.audio import check_writable
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.lora import Layout, LoRASettings, add_lora, copy_adapter, save_lora

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_positive(error: type[Exception] = ValueError, **values: float) -> None:
    """Raise ``error`` naming the first argument that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise error(f"{name} must be > 0, got {value}")


class CheckpointError(RLMusicError, RuntimeError):
    """A checkpoint does not hold what this module needs to continue."""


MODULE_CLASS = "module_class"  # checkpoint entry: the module class that saved it


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_name(path: str) -> str:
    """``module.QualifiedName`` of the class at import path ``path`` (aliases resolved); ``path`` if it does not import."""
    module, _, name = path.rpartition(".")
    try:
        return qualified_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return path


def check_checkpoint_class(checkpoint: dict, model_class: str, path: str | Path | None = None) -> None:
    """CheckpointError naming both classes if ``checkpoint`` was saved by a module class other than ``model_class``.

    The saving class is this library's own entry, else the class path LightningCLI keeps in the
    hyperparameters; a checkpoint with neither is not checked here.
    """
    saved = checkpoint.get(MODULE_CLASS) or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if saved is None or class_name(saved) == class_name(model_class):
        return
    model = model_class.rpartition(".")[2]
    raise CheckpointError(
        f"{f'checkpoint {path}' if path else 'the checkpoint'} was saved by {saved.rpartition('.')[2]} ({saved}), but the model "
        f"to resume is {model}; give the checkpoint of a {model} run, or leave out ckpt_path to start afresh"
    )


class BackboneModule(LightningModule):
    """Base class: a frozen backbone built in ``configure_model``, with a LoRA on one of its networks.

    Checkpoints keep only the trainable state (LoRA, scale layers, anything a subclass adds in
    ``trainable_state_prefixes``), never the frozen multi-GB backbone, and refuse to resume from a
    checkpoint that lacks it rather than silently training from scratch. The adapter is exported to
    ``<run dir>/adapter`` on global rank 0 with every checkpoint and at the end of fit.

    A backbone layer defines ``load_backbone``, ``adapted_network`` and ``adapter_layout``; its
    ``__init__`` takes (at least) ``backbone``, ``backbone_seed``, ``frozen_dtype``, ``lora_rank``,
    ``lora_alpha``, ``lora_targets``, ``gradient_checkpointing`` and ``export_to``, and calls
    ``super().__init__()`` first, which records every constructor argument as a hyperparameter.
    """

    trainable_state_prefixes: tuple[str, ...] = ()
    hparams_ignore: tuple[str, ...] = ()  # constructor arguments that are modules (rewards), not hyperparameters
    adapter_layout: Layout = "diffusers"

    def __init__(self) -> None:
        super().__init__()
        # Called here, it records the subclasses' arguments (Lightning walks the __init__ frames).
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        if self.hparams.frozen_dtype not in DTYPES:
            raise ValueError(f"frozen_dtype must be one of {sorted(DTYPES)}, got {self.hparams.frozen_dtype!r}")
        self.backbone: nn.Module | None = None
        self.strict_loading = False  # checkpoints hold only the trainable state

    # ------------------------------------------------------------------------ the backbone layer
    def load_backbone(self) -> nn.Module:
        """Build the frozen backbone from the hyperparameters (on the CPU)."""
        raise NotImplementedError

    @property
    def adapted_network(self) -> nn.Module:
        """The backbone's network that carries the adapters (the UNet, the MusicGen decoder)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ model
    @property
    def lora_settings(self) -> LoRASettings:
        hp = self.hparams
        return LoRASettings(rank=hp.lora_rank, alpha=hp.lora_alpha, targets=hp.lora_targets, init_seed=hp.backbone_seed)

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        self.backbone = self.load_backbone()
        self.add_adapters(self.adapted_network)
        if self.hparams.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.backbone.to(self.device)

    def add_adapters(self, network: nn.Module) -> None:
        """Put the trainable adapters on ``adapted_network`` (default: a fresh LoRA)."""
        add_lora(network, self.lora_settings)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that always stay in eval mode (their dropout would make the policy stochastic)."""
        return [m for m in (self.backbone,) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------------ checkpoints
    def is_trainable_state(self, key: str) -> bool:
        return ".lora_" in key or ".rl_scale." in key or key.startswith(self.trainable_state_prefixes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODULE_CLASS] = qualified_name(type(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_trainable_state(k)}
        if self.backbone is not None:
            self.export_adapter()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_class(checkpoint, qualified_name(type(self)), getattr(self._trainer, "ckpt_path", None))
        expected = {k: v for k, v in self.state_dict().items() if self.is_trainable_state(k)}
        saved = checkpoint.get("state_dict", {})
        missing = sorted(expected.keys() - saved.keys())
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks {len(missing)} trainable tensors of this model (e.g. {missing[:3]}); "
                "it was saved by a different model or LoRA configuration"
            )
        mismatched = [f"{k} {tuple(saved[k].shape)} (this model: {tuple(v.shape)})"
                      for k, v in expected.items() if saved[k].shape != v.shape]
        if mismatched:
            raise CheckpointError(
                f"{len(mismatched)} tensors of the checkpoint differ in shape from this model's (e.g. {mismatched[0]}): "
                "it was saved with other LoRA settings (lora_rank, lora_targets); resume with the settings it was saved with"
            )
        self.use_configured_optimizer_settings(checkpoint)

    def use_configured_optimizer_settings(self, checkpoint: dict) -> None:
        """Resume the optimizer's state (moments, step counts) with this module's settings (learning rate, betas, ...).

        Lightning would restore the saved settings too, silently ignoring a learning rate changed for the resumed run.
        """
        if self.backbone is None or not checkpoint.get("optimizer_states"):
            return  # nothing to optimise yet (load_from_checkpoint), or no optimizer saved
        configured = self.configure_optimizers()
        optimizers = configured if isinstance(configured, (list, tuple)) else [configured]
        for state, optimizer in zip(checkpoint.get("optimizer_states", []), optimizers):
            for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
                saved_group.update({key: value for key, value in group.items() if key != "params"})

    # ------------------------------------------------------------------------ export
    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective call under DDP: resolve it here, on every rank, never on rank 0 alone.
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if stage == "fit":
            self.check_outputs_writable()

    def check_outputs_writable(self) -> None:
        """OutputPathError naming the field, before any compute, if an adapter export could not be written."""
        check_writable(self.adapter_dir, "adapter_dir", replaced_whole=True)
        if self.hparams.export_to:
            check_writable(self.hparams.export_to, "export_to", replaced_whole=True)

    @property
    def run_dir(self) -> Path:
        """The run's directory (the logger's version directory, else ``default_root_dir``)."""
        run_dir = getattr(self, "_run_dir", None)
        if run_dir is None:
            raise RuntimeError("run_dir is known only once a Trainer has set this module up")
        return run_dir

    @property
    def adapter_dir(self) -> Path:
        """Where the adapter is exported, in ``adapter_layout`` (``<run dir>/adapter``)."""
        return self.run_dir / "adapter"

    def adapter_metadata(self) -> dict:
        return {"kind": type(self).__name__, "backbone": self.hparams.backbone}

    def write_extra_adapter_files(self, directory: Path) -> None:
        """Add module-specific files to an adapter export (written in the same atomic step)."""

    def export_adapter(self) -> Path | None:
        """Write the adapter on global rank 0; call it on every rank (metadata may need collectives)."""
        metadata = self.adapter_metadata()
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        return save_lora(self.adapted_network, self.adapter_dir, metadata, self.write_extra_adapter_files, layout=self.adapter_layout)

    def on_fit_end(self) -> None:
        exported = self.export_adapter()
        if exported is not None and self.hparams.export_to:
            copy_adapter(exported, self.hparams.export_to)
