"""Concept directions per decoder layer, how they are learned from pooled activations, and their file.

A direction file is a folder with ``directions.safetensors`` (the tensors) and ``directions.json``
(everything else, readable by hand)::

    directions.safetensors   directions [n_concepts, n_layers, n_components, D] (unit, sign-aligned)
                             scores [n_concepts, n_layers] (validation AUC or R^2), signs [n_concepts, n_layers, n_components]
    directions.json          {"concepts": ["C", "C#", ...], "layers": [0, 1, ...], "task": "multiclass",
                              "metric": "auc", "pooling": "mean", "method": "rfm", "backbone": "...",
                              "hidden_size": 1024, "label": "pitch_class", "layer_scores": {...}, "params": [...]}

Targets: ``binary`` (the ``positive`` class against the rest: one concept), ``multiclass`` (every
class against the rest: one concept per class) and ``regression`` (one concept, larger values
positive).

    directions = learn_directions(activations, labels, task="multiclass", method="rfm")
    directions.save("runs/rfm_note/directions")
    ConceptDirections.load("runs/rfm_note/directions").vectors("E")   # [n_layers, D]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlmusic_pl.data.audio import atomic_directory_write
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.steering.probes import ProbeError, ProbeSearch, fit_linear_probe, fit_rfm_probe

TENSORS_FILE = "directions.safetensors"
INFO_FILE = "directions.json"
TARGETS = ("binary", "multiclass", "regression")
METHODS = ("rfm", "linear")
Target = Literal["binary", "multiclass", "regression"]
Method = Literal["rfm", "linear"]


class DirectionFileError(RLMusicError, ValueError):
    """A direction file is missing, unreadable, or does not fit the model or concept asked for."""


@dataclass
class ConceptDirections:
    """Directions of one or more concepts in every probed decoder layer.

    Attributes:
        concepts: concept names (class names; for regression the label's name).
        layers: decoder-layer indices, in the order of the tensors' layer axis.
        directions: [n_concepts, n_layers, n_components, D], unit norm, sign-aligned with the labels.
        scores: [n_concepts, n_layers] validation score of each layer's probe (higher is better).
        signs: [n_concepts, n_layers, n_components] the sign each eigenvector was multiplied by.
        task: ``binary``, ``multiclass`` or ``regression``.
        method: ``rfm`` or ``linear`` (the baseline).
        pooling: how activations were pooled over time (``mean``, ``last``, ``max``).
        backbone: the backbone the activations came from.
        label: the name of the label column.
        params: [n_concepts][n_layers] the chosen probe hyperparameters.
    """

    concepts: list[str]
    layers: list[int]
    directions: Tensor
    scores: Tensor
    signs: Tensor
    task: str
    method: str
    pooling: str
    backbone: str
    label: str = "label"
    params: list[list[dict]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return "r2" if self.task == "regression" else "auc"

    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[-1])

    def index(self, concept: str) -> int:
        if concept not in self.concepts:
            raise DirectionFileError(f"concept {concept!r} is not in the direction file; it holds {self.concepts}")
        return self.concepts.index(concept)

    def vectors(self, concept: str, component: int = 0) -> Tensor:
        """[n_layers, D]: the concept's direction in each layer (eigenvector ``component``, 0 = the top one)."""
        if not 0 <= component < self.directions.shape[2]:
            raise DirectionFileError(f"component must be in [0, {self.directions.shape[2]}), got {component}")
        return self.directions[self.index(concept), :, component]

    def layer_scores(self, concept: str) -> Tensor:
        return self.scores[self.index(concept)]

    # ------------------------------------------------------------------------ file
    def save(self, directory: str | Path) -> Path:
        """Write the direction folder atomically; returns it."""
        tensors = {"directions": self.directions.contiguous().float(), "scores": self.scores.float(), "signs": self.signs.float()}
        info = {
            "concepts": self.concepts, "layers": self.layers, "task": self.task, "metric": self.metric, "method": self.method,
            "pooling": self.pooling, "backbone": self.backbone, "label": self.label, "hidden_size": self.hidden_size,
            "layer_scores": {c: dict(zip(map(str, self.layers), self.scores[i].tolist())) for i, c in enumerate(self.concepts)},
            "params": self.params,
        }

        def write(tmp: Path) -> None:
            save_file(tensors, str(Path(tmp) / TENSORS_FILE))
            (Path(tmp) / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")

        atomic_directory_write(directory, write)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> ConceptDirections:
        directory = Path(directory).expanduser()
        tensors_path, info_path = directory / TENSORS_FILE, directory / INFO_FILE
        if not tensors_path.is_file() or not info_path.is_file():
            raise DirectionFileError(
                f"{directory}: not a direction folder (expected {TENSORS_FILE} and {INFO_FILE}); "
                "learn directions first with `python -m rlmusic_pl fit --config configs/tiny/rfm_note.yaml`"
            )
        try:
            tensors = load_file(str(tensors_path))
            info = json.loads(info_path.read_text(encoding="utf-8"))
            directions = cls(
                concepts=list(info["concepts"]), layers=[int(i) for i in info["layers"]], directions=tensors["directions"],
                scores=tensors["scores"], signs=tensors["signs"], task=info["task"], method=info["method"],
                pooling=info["pooling"], backbone=info["backbone"], label=info.get("label", "label"), params=info.get("params", []),
            )
        except (OSError, ValueError, KeyError) as err:
            raise DirectionFileError(f"{directory}: unreadable direction folder ({type(err).__name__}: {err})") from err
        expected = (len(directions.concepts), len(directions.layers))
        if tuple(directions.directions.shape[:2]) != expected or tuple(directions.scores.shape) != expected:
            raise DirectionFileError(f"{directory}: tensor shapes {tuple(directions.directions.shape)} do not match "
                                     f"{expected[0]} concepts x {expected[1]} layers in {INFO_FILE}")
        return directions


def learn_directions(
    activations: Tensor, labels: list, val_mask: Tensor, task: Target, method: Method = "rfm", n_components: int = 1,
    positive: str | None = None, search: ProbeSearch = ProbeSearch(), linear_regularisation: float = 1.0,
    layers: list[int] | None = None, pooling: str = "mean", backbone: str = "", label: str = "label",
) -> ConceptDirections:
    """Fit a probe per layer (and per class, for ``multiclass``) and collect the directions.

    Args:
        activations: [N, n_layers, D] pooled activations of N labelled clips.
        labels: N labels: class names (``binary``, ``multiclass``) or numbers (``regression``).
        val_mask: [N] booleans, True for the validation split (scores, hyperparameter choice).
        task: ``binary`` (needs ``positive``), ``multiclass`` or ``regression``.
        method: ``rfm`` (AGOP eigenvectors of an ``xrfm`` probe) or ``linear`` (logistic/ridge weights; one component).
        n_components: eigenvectors kept per layer (RFM).
        positive: the positive class of a ``binary`` target.
        search: the RFM hyperparameter search.
        linear_regularisation: L2 strength of the linear baseline.
        layers: the decoder-layer index of each activation layer (default 0 .. n_layers - 1).
        pooling, backbone, label: recorded in the file.
    """
    if task not in TARGETS:
        raise ProbeError(f"task must be one of {TARGETS}, got {task!r}")
    if method not in METHODS:
        raise ProbeError(f"method must be one of {METHODS}, got {method!r}")
    if activations.dim() != 3 or activations.shape[0] != len(labels) or val_mask.shape != (len(labels),):
        raise ProbeError(f"expected activations [N, layers, D] with N labels and N validation flags, got "
                         f"{tuple(activations.shape)}, {len(labels)} labels and {tuple(val_mask.shape)} flags")
    if task == "regression":
        concepts, targets = [label], [torch.tensor([float(v) for v in labels])]
    else:
        names = [str(v) for v in labels]
        classes = sorted(set(names), key=_class_order)
        if task == "binary":
            if positive is None or positive not in classes:
                raise ProbeError(f"a binary target needs positive= one of the classes {classes}, got {positive!r}")
            classes = [positive]
        concepts = classes
        targets = [torch.tensor([name == c for name in names], dtype=torch.long) for c in classes]
    components = n_components if method == "rfm" else 1
    train = ~val_mask
    probe_task = "regression" if task == "regression" else "binary"
    results = []
    for concept, y in zip(concepts, targets):
        row = []
        for layer in range(activations.shape[1]):
            x = activations[:, layer].float()
            try:
                if method == "rfm":
                    row.append(fit_rfm_probe(x[train], y[train], x[val_mask], y[val_mask], probe_task, components, search))
                else:
                    row.append(fit_linear_probe(x[train], y[train], x[val_mask], y[val_mask], probe_task, linear_regularisation))
            except ProbeError as err:
                raise ProbeError(f"concept {concept!r}, layer {layer}: {err}") from err
        results.append(row)
    return ConceptDirections(
        concepts=concepts,
        layers=list(layers) if layers is not None else list(range(activations.shape[1])),
        directions=torch.stack([torch.stack([r.directions for r in row]) for row in results]),
        scores=torch.tensor([[r.score for r in row] for row in results]),
        signs=torch.stack([torch.stack([r.signs for r in row]) for row in results]),
        task=task, method=method, pooling=pooling, backbone=backbone, label=label,
        params=[[r.params for r in row] for row in results],
    )


def _class_order(name: str) -> tuple:
    """Numbers numerically (before names), names alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
