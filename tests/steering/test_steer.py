"""Steering hooks on the tiny MusicGen: every row steered, exact no-ops, inject chances, time schedules, reloaded files."""

import pytest
import torch
from torch import nn

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.steering.directions import ConceptDirections
from rlmusic_pl.steering.steer import Steering, SteeringDirection, SteeringError, layer_weights, time_schedule

FRAMES = 8
POLICY = dict(guidance_scale=3.0, temperature=1.0, top_k=8)


@pytest.fixture(scope="module")
def backbone():
    return MusicGenBackbone.load("tiny", text_length=16)


@pytest.fixture(scope="module")
def cond(backbone):
    return backbone.encode_prompts(["a C note", "a C note", "an E note"])


def unit_direction(width: int = 64, layers=(0, 1), seed: int = 0, **args) -> SteeringDirection:
    vector = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return SteeringDirection(torch.stack([vector / vector.norm()] * len(layers)), list(layers), **args)


def sample(backbone, cond, seed: int = 0):
    return backbone.sample(cond, FRAMES, generator=[torch.Generator().manual_seed(seed) for _ in range(len(cond))], **POLICY).codes


def layer_outputs(backbone, cond, steering: Steering | None = None) -> list[torch.Tensor]:
    """The last layer's output, steered or not (the final LayerNorm's input), at every step of a sampling run."""
    outputs = []
    handle = backbone.decoder.model.decoder.layer_norm.register_forward_pre_hook(lambda m, args: outputs.append(args[0].clone()))
    try:
        if steering is None:
            sample(backbone, cond)
        else:
            with steering:
                sample(backbone, cond)
    finally:
        handle.remove()
    return outputs


def test_every_row_of_the_batch_is_steered(backbone, cond):
    """The published hook takes output[0], which on transformers 5.x is the first row: only sample 0 changes."""
    plain = layer_outputs(backbone, cond)[0]
    steered = layer_outputs(backbone, cond, Steering(backbone, [unit_direction(coefficient=3.0, layers=(1,))]))[0]
    changed = (steered - plain).abs().amax(dim=(1, 2))
    assert plain.shape[0] == 6 and (changed > 1.0).all()  # all 3 samples, both guidance halves
    # It adds exactly coef x direction at every position (the last layer's own output is steered).
    direction = unit_direction(layers=(1,)).vectors[0]
    assert torch.allclose(steered - plain, (3.0 * direction).expand_as(plain), atol=1e-5)


def test_tuple_outputs_of_transformers_4_are_steered_on_every_row():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return (x, "cache")

    steering = Steering.__new__(Steering)
    steering.directions, steering.rows, steering.record, steering.step = [unit_direction(width=4, layers=(0,), coefficient=1.0)], "both", False, 0
    steering._coins = torch.Generator().manual_seed(0)
    layer = TupleLayer()
    layer.register_forward_hook(steering._hook(0))
    out = layer(torch.zeros(3, 2, 4))
    assert isinstance(out, tuple) and out[1] == "cache"
    assert torch.allclose(out[0], steering.directions[0].vectors[0].expand(3, 2, 4))


def test_conditional_rows_only(backbone, cond):
    plain = layer_outputs(backbone, cond)[0]
    steered = layer_outputs(backbone, cond, Steering(backbone, [unit_direction(coefficient=3.0, layers=(1,))], rows="conditional"))[0]
    changed = (steered - plain).abs().amax(dim=(1, 2))
    assert (changed[:3] > 1.0).all() and (changed[3:] == 0).all()


def test_coefficient_zero_and_inject_chance_zero_reproduce_the_unsteered_codes(backbone, cond):
    plain = sample(backbone, cond)
    with Steering(backbone, [unit_direction(coefficient=0.0)]):
        assert torch.equal(sample(backbone, cond), plain)
    with Steering(backbone, [unit_direction(coefficient=50.0, inject_chance=0.0)]):
        assert torch.equal(sample(backbone, cond), plain)
    with Steering(backbone, [unit_direction(coefficient=50.0)]):
        assert not torch.equal(sample(backbone, cond), plain)


def test_inject_chance_one_is_always_on_and_the_counter_advances_every_step(backbone, cond):
    steps = FRAMES + backbone.num_codebooks - 1
    with Steering(backbone, [unit_direction(coefficient=1.0, inject_chance=1.0)], record=True) as always:
        sample(backbone, cond)
    assert sorted((step, layer) for step, layer, _, _ in always.applied) == [(s, l) for s in range(steps) for l in (0, 1)]
    rate = 0.5
    with Steering(backbone, [unit_direction(coefficient=1.0, inject_chance=0.5, schedule=time_schedule("exp_decay", rate))],
                  record=True, seed=3) as sometimes:
        sample(backbone, cond)
    assert 0 < len(sometimes.applied) < 2 * steps
    # The factor follows the generation step, not the number of injections so far.
    assert all(factor == pytest.approx(rate**step) for step, _, _, factor in sometimes.applied)
    assert max(step for step, *_ in sometimes.applied) > len({step for step, *_ in sometimes.applied}) - 1


def test_each_of_several_directions_keeps_its_own_inject_chance_and_coefficient(backbone, cond):
    off = unit_direction(seed=1, coefficient=5.0, inject_chance=0.0)
    on = unit_direction(seed=2, coefficient=2.0)
    with Steering(backbone, [off, on], record=True) as steering:
        both = sample(backbone, cond)
    assert {index for _, _, index, _ in steering.applied} == {1}
    with Steering(backbone, [on]):
        assert torch.equal(sample(backbone, cond), both)


def test_per_sample_coefficients_match_separate_runs(backbone, cond):
    coefficients = torch.tensor([0.0, 4.0, -4.0])
    with Steering(backbone, [unit_direction(coefficient=coefficients)]):
        batched = sample(backbone, cond)
    for row, value in enumerate(coefficients.tolist()):
        with Steering(backbone, [unit_direction(coefficient=value)]):
            assert torch.equal(sample(backbone, cond[row : row + 1]), batched[row : row + 1])
    assert torch.equal(batched[0], sample(backbone, cond[0:1])[0])  # coefficient 0: the unsteered clip


def test_time_schedules():
    assert [time_schedule("constant")(t) for t in (0, 9)] == [1.0, 1.0]
    assert time_schedule("exp_decay", rate=0.9)(2) == pytest.approx(0.81)
    assert [time_schedule("linear_decay", steps=4)(t) for t in (0, 2, 4, 8)] == [1.0, 0.5, 0.0, 0.0]
    assert [time_schedule("linear_ramp", steps=4)(t) for t in (0, 2, 4, 8)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(SteeringError, match="schedule must be one of"):
        time_schedule("cosine")


def test_layer_weights():
    scores = torch.tensor([0.5, 1.0, 0.75, 0.6])
    assert layer_weights(scores, "all").tolist() == [1, 1, 1, 1]
    assert layer_weights(scores, "top_k", top_k=2).tolist() == [0, 1, 1, 0]
    weights = layer_weights(scores, "exp_weighting", base=2.0, decay=0.5)
    assert weights.tolist() == pytest.approx([0.0, 2.0, 2.0 * 0.5**2, 2.0 * 0.2**2])


def test_saved_directions_reload_and_steer_identically(backbone, cond, tmp_path):
    generator = torch.Generator().manual_seed(4)
    directions = ConceptDirections(
        concepts=["C", "E"], layers=[0, 1], directions=torch.nn.functional.normalize(torch.randn(2, 2, 1, 64, generator=generator), dim=-1),
        scores=torch.tensor([[0.6, 0.9], [0.7, 0.8]]), signs=torch.ones(2, 2, 1), task="multiclass", method="rfm",
        pooling="mean", backbone="tiny",
    )
    reloaded = ConceptDirections.load(directions.save(tmp_path / "dirs"))
    runs = []
    for source in (directions, reloaded):
        steer = SteeringDirection.from_directions(source, "E", coefficient=3.0, layer_mode="exp_weighting", inject_chance=0.5)
        with Steering(backbone, [steer], seed=1):
            runs.append(sample(backbone, cond))
    assert torch.equal(*runs)


def test_a_direction_of_another_width_is_refused(backbone):
    with pytest.raises(SteeringError, match="32 wide but the decoder's hidden size is 64"):
        Steering(backbone, [unit_direction(width=32)])
