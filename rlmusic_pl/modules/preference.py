"""PreferenceRewardModule: a Bradley-Terry reward model trained on pairwise preferences (DESIGN.md section 13).

A frozen audio and text encoder (CLAP by default, any ``AudioTextEncoder``) embeds each clip and its
prompt; a small head maps them to a score r. For a pair, P(chosen preferred) = sigma(r_chosen -
r_rejected), trained with -log sigma(r_chosen - r_rejected); a tie has target 1/2. Fit it on the pairs
of ``PromptAttributeDataModule(preferences=PreferencePairs(...))``; at the end of fit it exports the
reward model to ``<run dir>/reward_model`` (``PreferenceReward(checkpoint=...)`` loads it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryCalibrationError

from rlmusic_pl.data.audio import check_writable
from rlmusic_pl.modules.backbone_module import MODULE_CLASS, CheckpointError, check_checkpoint_class, qualified_name
from rlmusic_pl.rewards.encoders import AudioTextEncoder, CLAPEncoder
from rlmusic_pl.rewards.preference import PreferenceScorer, save_reward_model

EVAL_STAGES = ("val", "test")


def bradley_terry_loss(margin: Tensor, tie: Tensor) -> Tensor:
    """Mean over pairs of -log sigma(margin), or -(log sigma(margin) + log sigma(-margin)) / 2 for a tie.

    ``margin`` [B] is r_chosen - r_rejected; ``tie`` [B] marks pairs judged equal (target probability 1/2).
    """
    target = torch.where(tie.bool(), 0.5, 1.0).to(margin)
    return nn.functional.binary_cross_entropy_with_logits(margin, target)


def pair_correct(margin: Tensor, tie: Tensor) -> Tensor:
    """Per decided (non-tie) pair: 1 if the chosen clip scores higher, 1/2 on an exact draw, else 0."""
    decided = margin[~tie.bool()]
    return (decided > 0).float() + 0.5 * (decided == 0).float()


@contextlib.contextmanager
def cacheable():
    """No gradients, and no inference mode even inside validation: cached embeddings made there are used in training."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class PreferenceRewardModule(LightningModule):
    """Fits a reward model to pairwise preferences with the Bradley-Terry loss; only the head trains.

    Logs ``{train,val,test}/loss`` and ``/accuracy`` (fraction of decided pairs whose chosen clip
    scores higher), and on held-out pairs ``{val,test}/calibration_error``: the expected calibration
    error (``calibration_bins`` equal bins) of the predicted preference probabilities sigma(r_a - r_b),
    each decided pair counted in both orders so that the bins are symmetric.

    The frozen encoder's embeddings of each clip (by file) and prompt are cached in memory, so epochs
    after the first only run the head. At the start of the first fit the audio features'
    standardisation is set from the training clips (saved with checkpoints). Checkpoints hold the
    head, the standardisation and the optimizer, never the frozen encoder.

    Args:
        encoder: the frozen encoder (default ``CLAPEncoder()``: ``laion/larger_clap_music``);
            ``MelStatisticsEncoder`` for cheap runs.
        hidden_dim: width of the head's hidden layers.
        hidden_layers: number of hidden layers of the head (0: linear).
        dropout: dropout on the head's hidden activations while training (seeded per step).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        calibration_bins: bins of the expected calibration error.
        seed: seed of the head's initial weights and of the dropout masks (with the step).
        export_to: also export the reward model here at the end of fit (besides ``<run dir>/reward_model``).
    """

    def __init__(
        self,
        encoder: AudioTextEncoder | None = None,
        hidden_dim: int = 128,
        hidden_layers: int = 1,
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        calibration_bins: int = 10,
        seed: int = 0,
        export_to: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        if learning_rate <= 0 or calibration_bins < 1:
            raise ValueError(f"need learning_rate > 0 and calibration_bins >= 1, got {learning_rate} and {calibration_bins}")
        encoder = encoder if encoder is not None else CLAPEncoder()
        with torch.random.fork_rng(devices=[]):  # the head's initial weights depend on the seed alone
            torch.manual_seed(seed)
            self.scorer = PreferenceScorer(encoder, hidden_dim, hidden_layers, dropout)
        self.register_buffer("standardised", torch.tensor(False))
        self.metrics = nn.ModuleDict({stage: nn.ModuleDict({
            "loss": MeanMetric(), "accuracy": MeanMetric(), "calibration_error": BinaryCalibrationError(n_bins=calibration_bins),
        }) for stage in EVAL_STAGES})
        self._audio_cache: dict[str, Tensor] = {}
        self._text_cache: dict[str, Tensor] = {}
        self.strict_loading = False  # checkpoints leave out the frozen encoder

    # ------------------------------------------------------------------------ embeddings
    def embed_audio(self, files: list[str], waveforms: Tensor, sample_rate: int) -> Tensor:
        """Encoder embeddings [B, audio_dim] of clips, computed once per file."""
        missing = [i for i, file in enumerate(files) if file not in self._audio_cache]
        if missing:
            with cacheable():
                embedded = self.scorer.encoder.embed_audio(waveforms[missing].to(self.device), sample_rate).float().cpu()
            self._audio_cache.update({files[i]: row for i, row in zip(missing, embedded)})
        return torch.stack([self._audio_cache[file] for file in files]).to(self.device)

    def embed_text(self, prompts: list[str]) -> Tensor:
        """Encoder embeddings [B, text_dim] of prompts, computed once per prompt."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with cacheable():
                self._text_cache.update(zip(missing, self.scorer.encoder.embed_text(missing).float().cpu()))
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.device)

    def margins(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """r_chosen - r_rejected [B] of a batch of pairs (dropout only with a ``generator``)."""
        rate = int(batch["sample_rate"][0])
        text = self.embed_text(batch["prompt"])
        chosen = self.embed_audio(batch["chosen"], batch["chosen_audio"], rate)
        rejected = self.embed_audio(batch["rejected"], batch["rejected_audio"], rate)
        scores = self.scorer.score_embeddings(torch.cat([chosen, rejected]), torch.cat([text, text]), generator)
        return scores[: len(text)] - scores[len(text) :]

    # ------------------------------------------------------------------------ fit
    def configure_optimizers(self):
        head = [p for name, p in self.scorer.named_parameters() if not name.startswith("encoder.")]
        return torch.optim.AdamW(head, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective call under DDP: resolve it on every rank.
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if stage == "fit":
            check_writable(self.export_dir, "reward model directory", replaced_whole=True)
            if self.hparams.export_to:
                check_writable(self.hparams.export_to, "export_to", replaced_whole=True)

    @property
    def export_dir(self) -> Path:
        """Where the reward model is exported at the end of fit: ``<run dir>/reward_model``."""
        return self._run_dir / "reward_model"

    def on_train_start(self) -> None:
        if not self.standardised:
            self.standardise(self.trainer.train_dataloader)

    @torch.no_grad()
    def standardise(self, loader) -> None:
        """Set the audio features' standardisation from every clip ``loader`` yields (summed over ranks)."""
        dim = self.scorer.encoder.audio_dim
        total, squares, count = torch.zeros(dim, device=self.device), torch.zeros(dim, device=self.device), torch.zeros((), device=self.device)
        seen: set[str] = set()
        for batch in loader:
            rate = int(batch["sample_rate"][0])
            for side in ("chosen", "rejected"):
                keep = [i for i, file in enumerate(batch[side]) if file not in seen]
                seen.update(batch[side])
                if keep:
                    embedded = self.embed_audio([batch[side][i] for i in keep], batch[f"{side}_audio"][keep], rate).double()
                    total, squares, count = total + embedded.sum(0), squares + embedded.pow(2).sum(0), count + len(keep)
        total, squares, count = (self.trainer.strategy.reduce(x, reduce_op="sum") for x in (total, squares, count))
        mean = total / count
        self.scorer.audio_mean.copy_(mean)
        self.scorer.audio_std.copy_((squares / count - mean**2).clamp(min=0).sqrt().clamp(min=1e-6))
        self.standardised.fill_(True)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        margin = self.margins(batch, generator)
        loss = bradley_terry_loss(margin, batch["tie"])
        size = len(margin)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        correct = pair_correct(margin.detach(), batch["tie"])
        if len(correct):
            self.log("train/accuracy", correct.mean(), on_step=True, on_epoch=True, batch_size=len(correct))
        return loss

    # ------------------------------------------------------------------------ held-out pairs
    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def _reset_metrics(self, stage: str) -> None:
        # A reset under inference mode (a validate() run) leaves inference tensors as metric states,
        # which validation inside fit (run under no_grad) could not update: start every epoch afresh.
        with torch.inference_mode(False):
            for metric in self.metrics[stage].values():
                metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict) -> None:
        margin, tie = self.margins(batch), batch["tie"].bool()
        metrics = self.metrics[stage]
        metrics["loss"].update(bradley_terry_loss(margin, tie), weight=len(margin))
        correct = pair_correct(margin, tie)
        if len(correct):
            metrics["accuracy"].update(correct)
            decided = margin[~tie]
            probabilities = torch.sigmoid(torch.cat([decided, -decided])).float()
            metrics["calibration_error"].update(probabilities, torch.cat([torch.ones_like(decided), torch.zeros_like(decided)]).long())
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "accuracy")

    # ------------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODULE_CLASS] = qualified_name(type(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("scorer.encoder.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_class(checkpoint, qualified_name(type(self)), getattr(self._trainer, "ckpt_path", None))
        expected = {k: v for k, v in self.state_dict().items() if k.startswith("scorer.") and not k.startswith("scorer.encoder.")}
        saved = checkpoint.get("state_dict", {})
        bad = sorted(k for k, v in expected.items() if k not in saved or saved[k].shape != v.shape)
        if bad:
            raise CheckpointError(f"the checkpoint's reward head does not fit this model (e.g. {bad[:3]}): "
                                  "it was saved with another encoder or head size (hidden_dim, hidden_layers)")

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        metadata = {"metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")},
                    "trained": {"global_step": self.global_step, "epochs": self.current_epoch, **dict(self.hparams)}}
        for directory in filter(None, (self.export_dir, self.hparams.export_to)):
            save_reward_model(self.scorer, directory, metadata)
