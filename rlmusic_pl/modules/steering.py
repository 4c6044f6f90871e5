"""MusicRFM (seed 002): learn concept directions in MusicGen's decoder (``fit``), steer generation along them (``predict``).

``fit`` on a ``ConceptDataModule`` (labelled clips, encoded to codes once): every batch's pooled
per-layer activations are collected; at the end of the first epoch a probe per layer (an ``xrfm``
RFM, or the linear baseline) is fit on a stratified train/validation split, the per-layer validation
scores are logged (``probe/<method>/<concept>/layer<i>``, and the mean over concepts), and the
direction folder is written to ``<run dir>/directions`` (and copied to ``export_to``). With
``compare_linear`` the linear baseline is fit too, logged and written to ``<run dir>/directions_linear``.

``predict`` on a ``PromptAttributeDataModule``: for every prompt x seed x coefficient one clip,
steered toward ``concept`` with ``coefficient`` (0: the unsteered model; negative: away from it).
Every coefficient of a (prompt, seed) is generated in one batch from the same random draws (one
generator per sample, seeded by the seed alone), so coefficient 0 is exactly the unsteered clip and
only the steering differs between the columns. ``SweepWriter`` writes the WAVs, the table, the plots
and the listening page, with the coefficient as the swept axis; each clip's attributes gain
``steer_concept`` (the concept steered toward), which the metrics may read, e.g.
``PitchClassReward(attribute="steer_concept", hard=True)`` is the target-note accuracy; a CLAP
reward gives the text adherence, and ``ssim_to_strength0`` the similarity to the unsteered clip.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from rlmusic_pl.callbacks.sweep_clips import Clip
from rlmusic_pl.data.audio import check_writable
from rlmusic_pl.lora import copy_adapter
from rlmusic_pl.modules.backbone_module import check_positive
from rlmusic_pl.modules.musicgen import MusicGenModule
from rlmusic_pl.modules.musicgen_sweep import MusicGenSweepPredictor
from rlmusic_pl.modules.sweep import SweepError, check_seeds, check_strengths
from rlmusic_pl.rewards.base import Reward, as_rewards
from rlmusic_pl.steering.activations import POOLINGS, collect_activations, decoder_layers
from rlmusic_pl.steering.directions import INFO_FILE, METHODS, TARGETS, TENSORS_FILE, ConceptDirections, learn_directions
from rlmusic_pl.steering.probes import ProbeError, ProbeSearch
from rlmusic_pl.steering.steer import LAYER_MODES, SCHEDULES, Steering, SteeringDirection, SteeringError, time_schedule

log = logging.getLogger(__name__)

STEER_ATTRIBUTE = "steer_concept"
LEARN_FIRST = "python -m rlmusic_pl fit --config configs/tiny/rfm_note.yaml"


class SteeringModule(MusicGenSweepPredictor, MusicGenModule):
    """Concept directions of a frozen MusicGen's decoder layers (``fit``) and steered generation sweeps (``predict``).

    Args:
        task: ``multiclass`` (a direction per class, each against the rest), ``binary`` (``positive``
            against the rest) or ``regression`` (numeric labels, larger values positive).
        positive: the positive class of a ``binary`` task.
        method: ``rfm`` (top eigenvectors of an xRFM probe's AGOP) or ``linear`` (logistic/ridge weights).
        compare_linear: with ``method=rfm``, also fit, log and save the linear baseline.
        pooling: pooling of each layer's output over time: ``mean`` (notes), ``last`` (tempo) or ``max``.
        n_components: eigenvectors kept per layer and concept (RFM).
        probe_layers: decoder layers to probe (default: all).
        probe_val_fraction: share of the labelled clips held out (stratified by class) to choose and score the probes
            (not ``val_fraction``: a prompt data module's argument of that name would clash in the logged hyperparameters).
        search_trials: random-search trials of the RFM hyperparameters per layer (reg, bandwidth, exponent, centring).
        rfm_iters: RFM iterations per trial (early-stopped on validation).
        linear_regularisation: L2 strength of the linear probe.
        split_seed: seed of the train/validation split and of the hyperparameter search.
        directions: the direction folder to steer with (``predict``), as ``fit`` writes it to
            ``<run dir>/directions`` or ``export_to``.
        concept: the concept to steer toward (a class of the direction file; for regression its label).
        coefficients: steering coefficients to sweep (0: unsteered; negative: away from the concept).
        component: which eigenvector to steer along (0: the top one).
        layer_mode: ``all``, ``top_k`` (the best-scoring ``top_k_layers``) or ``exp_weighting``
            (``weight_base`` x (min-max normalised score)^(1 / ``weight_decay``)).
        top_k_layers: layers kept by ``top_k``.
        weight_base: the best layer's weight under ``exp_weighting``.
        weight_decay: the exponent's inverse under ``exp_weighting`` (lower: fewer layers matter).
        schedule: coefficient over generation steps: ``constant``, ``exp_decay`` (``schedule_rate``^t),
            ``linear_decay`` or ``linear_ramp`` (over ``schedule_steps``).
        schedule_rate: the rate of ``exp_decay``.
        schedule_steps: the length of ``linear_decay`` / ``linear_ramp`` in generation steps.
        inject_chance: probability of steering a layer at a step (coin per layer per step; 1: always).
        steer_rows: ``both`` halves of the guidance batch (as the published code) or ``conditional`` only.
        seeds: sampling seeds; each (prompt, seed) uses the same random draws at every coefficient.
        output_dir: where the sweep goes (default ``<default_root_dir>/sweep``).
        metrics: rewards whose components are the sweep table's metrics (see the module doc).
        duration_s: seconds per generated clip.
        guidance_scale: classifier-free guidance scale.
        temperature: sampling temperature.
        top_k: sampling top-k (0: none).
        sample_batch_size: most clips per sampling batch.
        **backbone_args: see ``MusicGenModule`` (backbone, frozen dtype, text length, export_to); no LoRA is added.
    """

    hparams_ignore = ("metrics",)

    def __init__(
        self,
        task: str = "multiclass",
        positive: str | None = None,
        method: str = "rfm",
        compare_linear: bool = True,
        pooling: str = "mean",
        n_components: int = 1,
        probe_layers: list[int] | None = None,
        probe_val_fraction: float = 0.25,
        search_trials: int = 8,
        rfm_iters: int = 30,
        linear_regularisation: float = 1.0,
        split_seed: int = 0,
        directions: str | None = None,
        concept: str | None = None,
        coefficients: list[float] = (-0.5, 0.0, 0.5, 1.0),
        component: int = 0,
        layer_mode: str = "all",
        top_k_layers: int = 16,
        weight_base: float = 1.0,
        weight_decay: float = 0.95,
        schedule: str = "constant",
        schedule_rate: float = 0.998,
        schedule_steps: int = 1500,
        inject_chance: float = 1.0,
        steer_rows: str = "both",
        seeds: list[int] = (0, 1),
        output_dir: str | None = None,
        metrics: list[Reward] | None = None,
        duration_s: float = 5.0,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 250,
        sample_batch_size: int = 8,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        for name, value, allowed in (("task", task, TARGETS), ("method", method, METHODS), ("pooling", pooling, POOLINGS),
                                     ("layer_mode", layer_mode, LAYER_MODES), ("schedule", schedule, SCHEDULES),
                                     ("steer_rows", steer_rows, ("both", "conditional"))):
            if value not in allowed:
                raise SteeringError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < probe_val_fraction < 1.0:
            raise ProbeError(f"probe_val_fraction must be in (0, 1), got {probe_val_fraction}")
        if not 0.0 <= inject_chance <= 1.0:
            raise SteeringError(f"inject_chance must be in [0, 1], got {inject_chance}")
        check_positive(SweepError, duration_s=duration_s, sample_batch_size=sample_batch_size, n_components=n_components)
        self.strengths = check_strengths(coefficients)
        self.seeds = check_seeds(seeds)
        self.search = ProbeSearch(trials=search_trials, iters=rfm_iters, seed=split_seed)
        self.schedule = time_schedule(schedule, schedule_rate, schedule_steps)  # fail now on a bad schedule
        self.metrics = nn.ModuleList(as_rewards(metrics, "SteeringModule metrics"))
        self.automatic_optimization = False
        self.learned: dict[str, ConceptDirections] = {}
        self.steering_directions: ConceptDirections | None = None
        self._activations: list[Tensor] = []
        self._labels: list = []

    # ------------------------------------------------------------------------ the backbone: no adapters
    def add_adapters(self, network: nn.Module) -> None:
        """Steering changes activations, not weights: no LoRA."""

    def configure_optimizers(self):
        return None  # nothing is trained by gradient: the probes are fit at the end of the epoch

    # ------------------------------------------------------------------------ fit: activations -> directions
    @property
    def adapter_dir(self) -> Path:
        """Where the learned directions go: ``<run dir>/directions``."""
        return self.run_dir / "directions"

    def check_outputs_writable(self) -> None:
        check_writable(self.adapter_dir, "directions output", replaced_whole=True)
        if self.hparams.export_to:
            check_writable(self.hparams.export_to, "export_to", replaced_whole=True)

    def on_train_epoch_start(self) -> None:
        self._activations, self._labels = [], []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        layers = self.hparams.probe_layers
        for codes, label in zip(batch["codes"], batch["label"]):  # clips may differ in length: one at a time
            self._activations.append(collect_activations(self.backbone, codes[None].to(self.device), self.hparams.pooling, layers))
            self._labels.append(label)

    def on_train_epoch_end(self) -> None:
        if self.learned:
            self.trainer.should_stop = True  # the directions are learned once; later epochs would only repeat it
            return
        if not self._activations:
            raise ProbeError("the concept data module yielded no clips")
        activations = torch.cat(self._activations)
        val_mask = stratified_split(self._labels, self.hparams.probe_val_fraction, self.hparams.split_seed, self.hparams.task == "regression")
        methods = [self.hparams.method] + (["linear"] if self.hparams.compare_linear and self.hparams.method == "rfm" else [])
        layers = self.hparams.probe_layers or list(range(len(decoder_layers(self.backbone))))
        label = getattr(self.trainer.datamodule, "label", "label") if self._trainer is not None else "label"
        for method in methods:
            learned = learn_directions(
                activations, self._labels, val_mask, self.hparams.task, method, self.hparams.n_components, self.hparams.positive,
                self.search, self.hparams.linear_regularisation, layers, self.hparams.pooling, self.hparams.backbone, label,
            )
            self.learned[method] = learned
            for index, concept in enumerate(learned.concepts):
                for layer, score in zip(learned.layers, learned.scores[index].tolist()):
                    self.log(f"probe/{method}/{concept}/layer{layer}", score)
            for layer, score in zip(learned.layers, learned.scores.mean(0).tolist()):
                self.log(f"probe/{method}/{learned.metric}_layer{layer}", score, prog_bar=False)
            log.info("%s probe, validation %s per layer (mean over concepts): %s", method, learned.metric,
                     ", ".join(f"{layer}: {score:.3f}" for layer, score in zip(learned.layers, learned.scores.mean(0).tolist())))
        self.trainer.should_stop = True

    def export_adapter(self) -> Path | None:
        """Write the learned directions (rank 0); None before they are learned."""
        if not self.learned or (self._trainer is not None and not self.trainer.is_global_zero):
            return None
        if "linear" in self.learned and self.hparams.method != "linear":
            self.learned["linear"].save(self.run_dir / "directions_linear")
        return self.learned[self.hparams.method].save(self.adapter_dir)

    def on_fit_end(self) -> None:
        exported = self.export_adapter()
        if exported is not None and self.hparams.export_to:
            copy_adapter(exported, self.hparams.export_to)

    # ------------------------------------------------------------------------ predict: steered sweeps
    def directions_path(self) -> Path:
        if not self.hparams.directions:
            raise SteeringError(f"give --model.directions=PATH, a direction folder learned by `{LEARN_FIRST}` (<run dir>/directions)")
        return Path(self.hparams.directions).expanduser()

    def setup(self, stage: str) -> None:
        if stage == "predict":  # before the backbone loads and before the sweep's settings are recorded
            self.steering_directions = ConceptDirections.load(self.directions_path())
            if self.hparams.concept is None:
                raise SteeringError(f"give --model.concept, one of {self.steering_directions.concepts}")
            self.steering_directions.index(str(self.hparams.concept))
            if self.steering_directions.backbone and self.steering_directions.backbone != self.hparams.backbone:
                log.warning("directions %s were learned on %r but the sweep loads %r",
                            self.directions_path(), self.steering_directions.backbone, self.hparams.backbone)
        super().setup(stage)

    def sweep_prompts(self):
        """The predict prompts as the metrics see them: with the ``steer_concept`` attribute."""
        datamodule = self.trainer.datamodule
        if not callable(getattr(datamodule, "split", None)):
            return datamodule
        concept = str(self.hparams.concept)

        class WithConcept:
            def split(self, name: str) -> list[dict]:
                return [{**item, "attributes": {**item["attributes"], STEER_ATTRIBUTE: concept}} for item in datamodule.split(name)]

        return WithConcept()

    def batch_clips(self, batch: dict, strengths: list[float]) -> list[Clip]:
        clips = super().batch_clips(batch, strengths)
        for clip in clips:
            clip.attributes[STEER_ATTRIBUTE] = str(self.hparams.concept)
        return clips

    def generation_settings(self) -> dict:
        """Everything that decides a clip besides its prompt, coefficient and seed (and the swept axis' name)."""
        hp = self.hparams
        digest = hashlib.sha256()
        for name in (TENSORS_FILE, INFO_FILE):
            digest.update((self.directions_path() / name).read_bytes())
        names = ("backbone", "backbone_seed", "text_length", "concept", "component", "layer_mode", "top_k_layers", "weight_base",
                 "weight_decay", "schedule", "schedule_rate", "schedule_steps", "inject_chance", "steer_rows", "duration_s",
                 "guidance_scale", "temperature", "top_k")
        return {"axis_label": "coefficient", "directions_sha256": digest.hexdigest(), **{name: hp[name] for name in names}}

    def steering(self, coefficients: Tensor, seed: int) -> Steering:
        """The steering of a batch whose sample i is steered with ``coefficients[i]``."""
        hp = self.hparams
        direction = SteeringDirection.from_directions(
            self.steering_directions, str(hp.concept), coefficients, hp.component, hp.layer_mode, hp.top_k_layers,
            hp.weight_base, hp.weight_decay, self.schedule, hp.inject_chance,
        )
        return Steering(self.backbone, [direction], rows=hp.steer_rows, seed=seed)

    def sweep_control(self, strengths: Tensor, seed: int) -> Steering:
        return self.steering(strengths, seed)


def stratified_split(labels: list, val_fraction: float, seed: int, regression: bool = False) -> Tensor:
    """[N] booleans, True for validation: ``val_fraction`` of each class (of all clips, for regression), at least one, chosen by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault("all" if regression else str(label), []).append(index)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for indices in groups.values():
        if len(indices) < 2:
            raise ProbeError(f"class {labels[indices[0]]!r} has a single clip: each class needs at least 2 (one to train, one to validate)")
        count = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
        chosen = torch.randperm(len(indices), generator=generator)[:count]
        mask[torch.tensor(indices)[chosen]] = True
    return mask
