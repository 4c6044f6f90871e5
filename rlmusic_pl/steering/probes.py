"""Per-layer concept probes on pooled activations: an RFM probe (``xrfm``) whose AGOP gives the directions,
and a linear/logistic probe as the baseline.

A Recursive Feature Machine learns a kernel predictor f(x) with a learned metric; the average gradient
outer product (AGOP) M = mean_i grad f(x_i) grad f(x_i)^T of the fitted predictor concentrates on the
directions along which the concept changes. Its top eigenvectors (``torch.linalg.eigh``: ``torch.lobpcg``
fails below a few thousand dimensions) are the concept directions; each gets the sign that makes its
projection increase with the label, so a positive steering coefficient pushes toward the concept
(toward the positive class, or toward larger values in regression).

Targets: ``binary`` (labels 0/1, one concept against the rest) or ``regression`` (real values). A
multiclass concept is fit one class against the rest (``rlmusic_pl.steering.learn``). The validation
score is the ROC AUC (binary) or R^2 (regression): higher is better for both.

    result = fit_rfm_probe(x_train, y_train, x_val, y_val, task="binary", search=ProbeSearch(trials=8))
    result.directions    # [n_components, D], unit norm, sign-aligned
    result.score         # validation AUC
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Literal

import torch
import xrfm
from sklearn.linear_model import LogisticRegression, Ridge
from torch import Tensor
from torchmetrics.functional import r2_score
from torchmetrics.functional.classification import binary_auroc

from rlmusic_pl.errors import RLMusicError

Task = Literal["binary", "regression"]
TASKS = ("binary", "regression")


class ProbeError(RLMusicError, ValueError):
    """Probe data that cannot be fit (too few examples, a single class, mismatched shapes)."""


@dataclass(frozen=True)
class ProbeSearch:
    """Random search of the RFM probe's hyperparameters, best by validation AUC (binary) or MSE (regression).

    Each trial draws reg log-uniformly from ``reg``, the bandwidth log-uniformly from ``bandwidth``,
    the kernel exponent uniformly from ``exponent`` and whether gradients are centred (as the
    published MusicRFM search does); ``iters`` RFM iterations with early stopping.
    """

    trials: int = 8
    iters: int = 30
    reg: tuple[float, float] = (1e-5, 10.0)
    bandwidth: tuple[float, float] = (1.0, 100.0)
    exponent: tuple[float, float] = (0.7, 1.4)
    seed: int = 0

    def draws(self) -> list[dict]:
        """The trials' hyperparameters (deterministic in ``seed``)."""
        if self.trials < 1 or self.iters < 1:
            raise ProbeError(f"the probe search needs trials >= 1 and iters >= 1, got {self.trials} and {self.iters}")
        generator = torch.Generator().manual_seed(self.seed)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator))

        def log_uniform(low: float, high: float) -> float:
            return math.exp(uniform(math.log(low), math.log(high)))

        return [
            {"reg": log_uniform(*self.reg), "bandwidth": log_uniform(*self.bandwidth), "exponent": uniform(*self.exponent),
             "center_grads": bool(torch.rand((), generator=generator) < 0.5)}
            for _ in range(self.trials)
        ]


@dataclass
class ProbeResult:
    """One layer's probe: its directions, their signs, its validation score and the chosen hyperparameters.

    Attributes:
        directions: [n_components, D] unit vectors in the activation space, sign-aligned with the labels.
        signs: [n_components] the sign (+1 or -1) each eigenvector was multiplied by.
        score: validation ROC AUC (binary) or R^2 (regression).
        mse: validation mean squared error of the probe's predictions (regression; NaN for binary).
        params: the hyperparameters of the chosen probe.
    """

    directions: Tensor
    signs: Tensor
    score: float
    mse: float
    params: dict


def check_probe_data(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, task: Task) -> None:
    if task not in TASKS:
        raise ProbeError(f"task must be one of {TASKS}, got {task!r}")
    for name, x, y in (("train", x_train, y_train), ("validation", x_val, y_val)):
        if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ProbeError(f"{name} activations must be [N, D] with N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] < 2:
            raise ProbeError(f"the {name} split holds {x.shape[0]} examples; give more labelled clips (or a larger val_fraction)")
        if task == "binary" and len(torch.unique(y)) < 2:
            raise ProbeError(f"the {name} split holds only one class ({int(y[0])}): a binary probe needs examples of both")
    if x_train.shape[1] != x_val.shape[1]:
        raise ProbeError(f"train and validation activations differ in width: {x_train.shape[1]} and {x_val.shape[1]}")


def standardise(x_train: Tensor, *others: Tensor) -> list[Tensor]:
    """Centre on the training mean and divide by one global scale (an isotropic map: directions are unchanged)."""
    mean = x_train.mean(0)
    scale = (x_train - mean).pow(2).mean().sqrt().clamp(min=1e-12)
    return [((x - mean) / scale).float() for x in (x_train, *others)]


def validation_score(predictions: Tensor, labels: Tensor, task: Task) -> tuple[float, float]:
    """(AUC, NaN) for binary labels, (R^2, MSE) for regression."""
    predictions, labels = predictions.float().flatten(), labels.float().flatten()
    if task == "binary":
        return float(binary_auroc(predictions, labels.long())), math.nan
    return float(r2_score(predictions, labels)), float((predictions - labels).pow(2).mean())


def top_eigenvectors(matrix: Tensor, n_components: int) -> Tensor:
    """[n_components, D]: the unit eigenvectors of the symmetric ``matrix`` with the largest eigenvalues."""
    _, vectors = torch.linalg.eigh(matrix.double())
    return vectors.flip(-1)[:, :n_components].T.float()


def align_signs(directions: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each direction so that its projection correlates positively with the labels."""
    projections = (x - x.mean(0)) @ directions.T  # [N, C]
    correlation = (projections * (y.float() - y.float().mean())[:, None]).sum(0)
    signs = torch.where(correlation < 0, -1.0, 1.0)
    return directions * signs[:, None], signs


def fit_rfm_probe(
    x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, task: Task,
    n_components: int = 1, search: ProbeSearch = ProbeSearch(),
) -> ProbeResult:
    """Fit an ``xrfm`` RFM probe per trial of ``search``, keep the best on validation, take its AGOP's top eigenvectors."""
    check_probe_data(x_train, y_train, x_val, y_val, task)
    train, val = standardise(x_train, x_val)
    targets, val_targets = (y_train.long(), y_val.long()) if task == "binary" else (y_train.float(), y_val.float())
    best = None
    for params in search.draws():
        model = xrfm.xRFM(
            rfm_params={
                "model": {"kernel": "l2_high_dim", "bandwidth": params["bandwidth"], "exponent": params["exponent"],
                          "diag": False, "bandwidth_mode": "constant"},
                "fit": {"reg": params["reg"], "iters": search.iters, "center_grads": params["center_grads"],
                        "early_stop_rfm": True, "get_agop_best_model": True, "return_best_params": True, "verbose": False},
            },
            max_leaf_size=len(train) + 1,  # one leaf: a single RFM on all examples (no tree splits)
            device="cpu" if train.device.type == "cpu" else train.device,
            tuning_metric="auc" if task == "binary" else "mse",
            random_state=search.seed,
            use_temperature_tuning=False,
            verbose=False,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # xrfm prints progress regardless of verbose
            model.fit(train, targets, val, val_targets)
            predictions = torch.as_tensor(model.predict_proba(val)[:, 1] if task == "binary" else model.predict(val))
        score, mse = validation_score(predictions, y_val, task)
        if not math.isfinite(score):
            continue
        if best is None or (score > best[0] if task == "binary" else mse < best[1]):
            best = (score, mse, params, model.collect_best_agops()[0])
    if best is None:
        raise ProbeError("no trial of the RFM probe search gave a finite validation score; widen the search ranges")
    score, mse, params, agop = best
    directions, signs = align_signs(top_eigenvectors(agop.cpu(), n_components), torch.cat([train, val]), torch.cat([y_train, y_val]))
    return ProbeResult(directions=directions, signs=signs, score=score, mse=mse, params=params)


def fit_linear_probe(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, task: Task, regularisation: float = 1.0) -> ProbeResult:
    """The baseline: logistic (binary) or ridge (regression) regression; its weight vector is the one direction.

    ``regularisation`` is the L2 strength (scikit-learn's ``1 / C`` for logistic, ``alpha`` for ridge),
    applied to standardised activations.
    """
    check_probe_data(x_train, y_train, x_val, y_val, task)
    train, val = standardise(x_train, x_val)
    if task == "binary":
        model = LogisticRegression(C=1.0 / regularisation, max_iter=1000).fit(train.numpy(), y_train.long().numpy())
        predictions = torch.as_tensor(model.predict_proba(val.numpy())[:, 1])
    else:
        model = Ridge(alpha=regularisation).fit(train.numpy(), y_train.float().numpy())
        predictions = torch.as_tensor(model.predict(val.numpy()))
    score, mse = validation_score(predictions, y_val, task)
    weights = torch.as_tensor(model.coef_, dtype=torch.float32).reshape(1, -1)
    directions, signs = align_signs(weights / weights.norm().clamp(min=1e-12), torch.cat([train, val]), torch.cat([y_train, y_val]))
    return ProbeResult(directions=directions, signs=signs, score=score, mse=mse, params={"regularisation": regularisation})
