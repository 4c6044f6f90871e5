"""What every AudioLDM2 LightningModule here shares: a frozen backbone, a LoRA on its UNet, lean checkpoints."""

from __future__ import annotations

from torch import nn

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.modules.backbone_module import DTYPES, BackboneModule, CheckpointError, check_checkpoint_class, check_positive

__all__ = ["DTYPES", "AudioLDM2Module", "CheckpointError", "check_checkpoint_class", "check_positive"]


class AudioLDM2Module(BackboneModule):
    """Base class: builds the frozen AudioLDM2 backbone and a LoRA on its UNet in ``configure_model``.

    Checkpoints keep only the trainable state (LoRA, scale layers, anything a subclass adds in
    ``trainable_state_prefixes``), never the frozen multi-GB backbone, and refuse to resume from a
    checkpoint that lacks it rather than silently training from scratch (``BackboneModule``). The
    adapter is exported in diffusers' LoRA format.

    Args:
        backbone: hub id, local diffusers directory, or ``tiny`` (random weights, offline).
        backbone_seed: seed of the ``tiny`` backbone's weights.
        frozen_dtype: dtype of the frozen weights (``float16`` halves GPU memory under 16-mixed).
        text_length: T5 tokens per prompt (prompts are padded/truncated to it).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / rank).
        lora_targets: ``attention``, ``self_attention``, ``attention+conv``, ``self_attention+conv``
            or a regular expression over UNet module names.
        gradient_checkpointing: recompute UNet activations in the backward pass to save memory.
        export_to: also copy the exported adapter to this directory at the end of fit (e.g. under
            ``checkpoints/``); it is always exported to ``<run dir>/adapter``.
    """

    def __init__(
        self,
        backbone: str = "cvssp/audioldm2-music",
        backbone_seed: int = 0,
        frozen_dtype: str = "float32",
        text_length: int = 64,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_targets: str = "attention",
        gradient_checkpointing: bool = False,
        export_to: str | None = None,
    ) -> None:
        super().__init__()

    def load_backbone(self) -> AudioLDM2Backbone:
        hp = self.hparams
        return AudioLDM2Backbone.load(hp.backbone, seed=hp.backbone_seed, dtype=DTYPES[hp.frozen_dtype], text_length=hp.text_length)

    @property
    def adapted_network(self) -> nn.Module:
        return self.backbone.unet
