"""What every MusicGen LightningModule here shares: a frozen MusicGen, a LoRA on its decoder, lean checkpoints."""

from __future__ import annotations

from torch import nn

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.modules.backbone_module import DTYPES, BackboneModule


class MusicGenModule(BackboneModule):
    """Base class: builds the frozen MusicGen backbone and a LoRA on its decoder in ``configure_model``.

    Subclasses add the algorithm (``training_step``, ``configure_optimizers`` over
    ``rlmusic_pl.lora.lora_parameters(self.backbone.decoder)``). Checkpoints keep only the trainable
    state and refuse checkpoints that lack it (``BackboneModule``); the adapter is exported in peft's
    own layout, so ``peft.PeftModel.from_pretrained(model.decoder, "<run dir>/adapter")`` loads it.

    Args:
        backbone: hub id (e.g. ``facebook/musicgen-small``), a saved MusicGen directory, or ``tiny``
            (random weights, offline).
        backbone_seed: seed of the ``tiny`` backbone's weights and of the LoRA initialisation.
        frozen_dtype: dtype of the frozen weights (``float16`` or ``bfloat16`` halve GPU memory).
        text_length: T5 tokens per prompt (prompts are padded/truncated to it).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / rank).
        lora_targets: ``attention`` (self- and cross-attention projections), ``self_attention``,
            ``attention+ffn``, ``self_attention+ffn``, or a regular expression over decoder module names.
        gradient_checkpointing: recompute decoder-layer activations in the backward pass to save memory.
        export_to: also copy the exported adapter to this directory at the end of fit (e.g. under
            ``checkpoints/``); it is always exported to ``<run dir>/adapter``.
    """

    adapter_layout = "peft"

    def __init__(
        self,
        backbone: str = "facebook/musicgen-small",
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

    def load_backbone(self) -> MusicGenBackbone:
        hp = self.hparams
        return MusicGenBackbone.load(hp.backbone, seed=hp.backbone_seed, dtype=DTYPES[hp.frozen_dtype], text_length=hp.text_length)

    @property
    def adapted_network(self) -> nn.Module:
        return self.backbone.decoder
