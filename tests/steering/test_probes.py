"""Probes and direction files on synthetic activations whose concept direction is known."""

import math

import pytest
import torch

from rlmusic_pl.steering.directions import ConceptDirections, DirectionFileError, learn_directions
from rlmusic_pl.steering.probes import ProbeError, ProbeSearch, fit_linear_probe, fit_rfm_probe, top_eigenvectors

SEARCH = ProbeSearch(trials=2, iters=5)


def planted(n: int, dim: int = 24, seed: int = 0, regression: bool = False):
    """Activations with an offset, where the label depends on one planted unit direction only."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator)
    direction /= direction.norm()
    x = torch.randn(n, dim, generator=generator) * 2 + 5
    projection = (x - 5) @ direction
    y = 3 * projection if regression else (projection > 0).long()
    return x, y, direction


@pytest.mark.parametrize("method", ["rfm", "linear"])
@pytest.mark.parametrize("task", ["binary", "regression"])
def test_probe_recovers_the_planted_direction_with_its_sign(method, task):
    x, y, direction = planted(320, regression=task == "regression")
    fit = fit_rfm_probe if method == "rfm" else fit_linear_probe
    args = (x[:240], y[:240], x[240:], y[240:], task)
    result = fit(*args, 2, SEARCH) if method == "rfm" else fit(*args)
    cosine = float(result.directions[0] @ direction)
    assert cosine > 0.8, cosine  # recovered, and with the sign that increases the label
    assert result.directions.norm(dim=-1).allclose(torch.ones(len(result.directions)), atol=1e-5)
    assert result.score > (0.9 if task == "binary" else 0.8)
    assert math.isnan(result.mse) == (task == "binary")


def test_flipped_labels_flip_the_direction():
    x, y, direction = planted(200)
    result = fit_rfm_probe(x[:150], 1 - y[:150], x[150:], 1 - y[150:], "binary", 1, SEARCH)
    assert float(result.directions[0] @ direction) < -0.8


def test_eigh_gives_the_top_eigenvectors_in_order():
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))[0]
    matrix = basis @ torch.diag(torch.tensor([1.0, 5.0, 2.0, 9.0, 0.5, 3.0])) @ basis.T
    top = top_eigenvectors(matrix, 2)
    assert abs(float(top[0] @ basis[:, 3])) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(top[1] @ basis[:, 1])) == pytest.approx(1.0, abs=1e-5)


def test_probe_refuses_a_single_class_split():
    x, y, _ = planted(40)
    with pytest.raises(ProbeError, match="only one class"):
        fit_linear_probe(x[:20], torch.zeros(20, dtype=torch.long), x[20:], y[20:], "binary")


def test_multiclass_learns_one_direction_per_class_and_the_file_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(2)
    dim, layers, per_class = 16, 2, 40
    means = torch.randn(3, dim, generator=generator) * 3  # three classes, separated along their means
    x = torch.cat([means[c] + torch.randn(per_class, dim, generator=generator) for c in range(3)])
    activations = torch.stack([x, torch.randn_like(x)], dim=1)  # layer 1 carries no information
    labels = [name for name in ("A", "B", "C") for _ in range(per_class)]
    val = torch.arange(len(labels)) % 4 == 0
    learned = learn_directions(activations, labels, val, task="multiclass", method="rfm", n_components=2, search=SEARCH,
                               layers=[3, 7], backbone="tiny", label="note")
    assert learned.concepts == ["A", "B", "C"] and learned.layers == [3, 7]
    assert learned.directions.shape == (3, layers, 2, dim)
    assert (learned.scores[:, 0] > 0.9).all() and (learned.scores[:, 1] < 0.8).all()
    for c in range(3):  # each class's direction points from the other classes toward it
        others = means[[i for i in range(3) if i != c]].mean(0)
        assert float(learned.vectors(["A", "B", "C"][c])[0] @ (means[c] - others)) > 0

    learned.save(tmp_path / "dirs")
    loaded = ConceptDirections.load(tmp_path / "dirs")
    assert torch.equal(loaded.directions, learned.directions) and torch.equal(loaded.scores, learned.scores)
    assert (loaded.concepts, loaded.layers, loaded.task, loaded.metric, loaded.label) == (["A", "B", "C"], [3, 7], "multiclass", "auc", "note")
    with pytest.raises(DirectionFileError, match="'D' is not in the direction file"):
        loaded.vectors("D")


def test_binary_and_regression_targets(tmp_path):
    x, y, direction = planted(160, dim=12)
    activations = x[:, None]
    val = torch.arange(160) >= 120
    binary = learn_directions(activations, ["yes" if v else "no" for v in y.tolist()], val, "binary", "linear", positive="yes")
    assert binary.concepts == ["yes"] and float(binary.vectors("yes")[0] @ direction) > 0.8
    with pytest.raises(ProbeError, match="positive="):
        learn_directions(activations, y.tolist(), val, "binary", "linear")
    x, y, direction = planted(160, dim=12, regression=True)
    regression = learn_directions(x[:, None], y.tolist(), val, "regression", "linear", label="tempo")
    assert regression.concepts == ["tempo"] and regression.metric == "r2"
    assert float(regression.vectors("tempo")[0] @ direction) > 0.9


def test_loading_a_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DirectionFileError, match="not a direction folder"):
        ConceptDirections.load(tmp_path)
