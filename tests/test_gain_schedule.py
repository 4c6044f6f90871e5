"""The gain schedule's file format: adapters written before it moved out of the Stage-2 module still load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.gain_schedule import GAIN_SCHEDULE, GainSchedule, load_gain_schedule, midpoint_log_exponent, save_gain_schedule
from rlmusic_pl.lora import LoRAError, LoRASettings, add_lora, scale_layers


@pytest.fixture
def unet():
    backbone = AudioLDM2Backbone.load("tiny")
    add_lora(backbone.unet, LoRASettings(targets="self_attention"))
    return backbone.unet


def layers(unet) -> int:
    return len(scale_layers(unet))


def test_a_gain_schedule_file_in_the_first_stage2_format_loads(unet, tmp_path):
    # Written by hand exactly as ScalePPOModule wrote gain_schedule.safetensors before the move.
    mean = torch.linspace(-0.1, 0.1, 2 * layers(unet))
    settings = {"conditioning": "strength", "per_channel": False, "num_train_timesteps": 1000}
    save_file({"mean": mean}, str(tmp_path / "gain_schedule.safetensors"), metadata={"rlmusic_pl": json.dumps(settings)})
    schedule = load_gain_schedule(unet, tmp_path)
    assert schedule.settings == {**settings, "shared": False}
    torch.testing.assert_close(schedule.mean.detach(), mean, rtol=0, atol=0)
    assert not schedule.mean.requires_grad


def test_saving_keeps_the_format_and_round_trips(unet, tmp_path):
    channels = {name: layer.gain.numel() for name, layer in scale_layers(unet).items()}
    schedule = GainSchedule(channels, conditioning="strength_step", per_channel=True, num_train_timesteps=500)
    with torch.no_grad():
        schedule.mean.normal_()
    path = save_gain_schedule(schedule, tmp_path)
    assert path == tmp_path / GAIN_SCHEDULE
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["mean"]
        assert json.loads(handle.metadata()["rlmusic_pl"]) == {
            "conditioning": "strength_step", "per_channel": True, "num_train_timesteps": 500, "shared": False}
    torch.testing.assert_close(load_gain_schedule(unet, tmp_path).mean, schedule.mean.detach(), rtol=0, atol=0)


def test_a_directory_without_a_schedule_gives_none_and_a_wrong_size_is_a_clear_error(unet, tmp_path):
    assert load_gain_schedule(unet, tmp_path) is None
    settings = {"conditioning": "none", "per_channel": False, "num_train_timesteps": 1000}
    save_file({"mean": torch.zeros(3)}, str(tmp_path / GAIN_SCHEDULE), metadata={"rlmusic_pl": json.dumps(settings)})
    with pytest.raises(LoRAError, match=f"holds 3 coefficients, but the adapter's LoRA layers need {layers(unet)}"):
        load_gain_schedule(unet, tmp_path)


def test_a_schedule_this_version_does_not_know_is_an_error_naming_the_file(unet, tmp_path):
    settings = {"conditioning": "interior_base", "per_channel": False, "num_train_timesteps": 1000, "shared": True,
                "context_attribute": "centroid", "context_center": 0.07, "context_scale": 0.02}  # removed in favour of power_position
    save_file({"mean": torch.zeros(4)}, str(tmp_path / GAIN_SCHEDULE), metadata={"rlmusic_pl": json.dumps(settings)})
    with pytest.raises(LoRAError, match=f"{GAIN_SCHEDULE}: gain schedule settings .* do not fit this version .*conditioning must be one of"):
        load_gain_schedule(unet, tmp_path)


def test_a_shared_schedule_gives_every_layer_the_same_multiplier_and_round_trips(unet, tmp_path):
    channels = {name: layer.gain.numel() for name, layer in scale_layers(unet).items()}
    schedule = GainSchedule(channels, conditioning="strength", shared=True)
    assert schedule.mean.numel() == 2
    multipliers = schedule.multipliers(torch.tensor([[0.5, -0.5]]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.3))
    assert multipliers.keys() == channels.keys()
    for value in multipliers.values():
        torch.testing.assert_close(value, torch.tensor([1.5, 1.25, 1.0]))
    with torch.no_grad():
        schedule.mean.copy_(torch.tensor([0.2, -0.1]))
    save_gain_schedule(schedule, tmp_path)
    loaded = load_gain_schedule(unet, tmp_path)
    assert loaded.shared and loaded.settings == schedule.settings
    torch.testing.assert_close(loaded.mean, schedule.mean.detach(), rtol=0, atol=0)


def test_shared_and_per_channel_exclude_each_other():
    with pytest.raises(ValueError, match="shared by all layers or per channel"):
        GainSchedule({"a": 4}, shared=True, per_channel=True)


def test_an_interior_schedule_keeps_the_full_strength_slider_and_bends_the_strengths_between():
    schedule = GainSchedule({"a": 4, "b": 4}, conditioning="interior", shared=True)
    assert schedule.mean.numel() == 2
    theta = torch.tensor([[0.4, -0.2], [-0.3, 0.6]])  # one row per sample
    multipliers = schedule.multipliers(theta, torch.tensor([1.0, 0.5]), torch.tensor(0.7))
    # s = 1: 1 whatever theta and step; s = 0.5: 1 + (1 - 0.5) * (-0.3 + 0.6 * 0.5) = 1.
    torch.testing.assert_close(multipliers["a"], torch.tensor([1.0, 1.0]))
    bent = schedule.multipliers(torch.tensor([[0.4, -0.2]]), torch.tensor([0.25, 0.5]), torch.tensor(0.7))["b"]
    torch.testing.assert_close(bent, torch.tensor([1 + 0.75 * (0.4 - 0.05), 1 + 0.5 * (0.4 - 0.1)]))


def test_a_clip_aware_schedule_standardises_the_attribute_it_was_shown_and_round_trips(unet, tmp_path):
    channels = {name: layer.gain.numel() for name, layer in scale_layers(unet).items()}
    schedule = GainSchedule(channels, conditioning="power_position", shared=True, context_attribute="centroid")
    values = torch.tensor([0.05, 0.07, 0.06, 0.10, 0.02])
    schedule.observe_context(values[:2])  # in two batches: the running statistics are those of all five
    schedule.observe_context(values[2:])
    torch.testing.assert_close(schedule.context_norm, torch.stack([values.mean(), values.std(unbiased=False)]))
    schedule.set_context(values)
    torch.testing.assert_close(schedule.context, (values - values.mean()) / values.std(unbiased=False))
    with torch.no_grad():
        schedule.mean.copy_(torch.tensor([0.1, 0.2, -0.4]))
    save_gain_schedule(schedule, tmp_path)
    loaded = load_gain_schedule(unet, tmp_path)
    assert loaded.settings == schedule.settings and loaded.settings["context_attribute"] == "centroid"
    torch.testing.assert_close(loaded.context_norm, schedule.context_norm)
    torch.testing.assert_close(loaded.mean, schedule.mean)


def test_the_midpoint_log_exponent_of_a_power_curve_is_its_exponent():
    gamma = torch.tensor([0.5, 1.0, 2.0, 3.0])
    at_zero, span = torch.tensor([0.1, 0.2, -0.3, 0.4]), torch.tensor([0.05, -0.1, 0.2, 0.3])  # rising and falling clips
    exponent = midpoint_log_exponent(at_zero, at_zero + span * 0.5**gamma, at_zero + span)
    torch.testing.assert_close(exponent, gamma.log())
    still = midpoint_log_exponent(torch.zeros(2), torch.tensor([0.0, 0.1]), torch.zeros(2))  # the slider does not move these
    assert torch.isfinite(still).all()


def test_a_power_position_schedule_raises_the_strength_to_a_power_of_the_clip_and_keeps_both_ends():
    schedule = GainSchedule({"a": 4, "b": 4}, conditioning="power_position", shared=True, context_attribute="centroid")
    assert schedule.mean.numel() == 3
    theta = torch.tensor([[0.3, -0.2, 0.5]])
    strength, q = torch.tensor([0.0, 0.25, 0.5, 1.0, -0.5, -1.0]), torch.tensor([1.0, -1.0, 2.0, 1.0, 0.5, 1.0])
    multipliers = schedule.multipliers(theta, strength, torch.tensor(0.3), q)["a"]
    power = (0.3 - 0.2 * strength.abs() + 0.5 * q).exp()
    expected = torch.where(strength == 0, torch.ones(6), strength.abs() ** (power - 1))
    torch.testing.assert_close(multipliers, expected)
    torch.testing.assert_close(multipliers[[0, 3, 5]], torch.ones(3))  # s = 0 and +-1 stay Stage 1's
    assert [schedule.keeps(s) for s in (0.0, 0.5, 1.0, -1.0)] == [True, False, True, True]


def test_a_clip_aware_schedule_reads_each_side_of_the_sweep_off_its_own_pilots():
    power = GainSchedule({"a": 4}, conditioning="power_position", shared=True, context_attribute="centroid")
    assert power.pilot_strengths([0.0, 0.5, 1.0]) == [0.0, 0.5, 1.0]
    pilots = power.pilot_strengths([-1.0, -0.25, 0.0, 0.75])
    assert pilots == [0.0, 0.5, 1.0, -0.5, -1.0]
    attributes = torch.tensor([[0.0], [0.25], [1.0], [-0.5], [-1.0]])  # late on the positive side (gamma 2), even below 0
    values = power.clip_values([-1.0, -0.25, 0.0, 0.75], attributes)
    torch.testing.assert_close(values[1.0], torch.tensor([2.0]).log())
    torch.testing.assert_close(values[-1.0], torch.tensor([0.0]))


def test_a_clip_aware_schedule_needs_what_to_measure_and_the_clips_values():
    with pytest.raises(ValueError, match="context_attribute 'centroid' or 'probe'"):
        GainSchedule({"a": 4}, conditioning="power_position")
    schedule = GainSchedule({"a": 4}, conditioning="power_position", context_attribute="probe")
    with pytest.raises(LoRAError, match="needs each clip.s q"):
        schedule.multipliers(torch.zeros(1, 3), torch.tensor([0.5]), torch.tensor(0.5))
    assert "context_moments" not in GainSchedule({"a": 4}, conditioning="interior").state_dict()  # older checkpoints load


def test_clip_attributes_that_are_not_numbers_or_do_not_fit_the_batch_are_clear_errors():
    schedule = GainSchedule({"a": 4}, conditioning="power_position", shared=True, context_attribute="centroid")
    with pytest.raises(ValueError, match="must be finite numbers"):
        schedule.observe_context(torch.tensor([0.1, float("nan")]))
    with pytest.raises(LoRAError, match="3 clip values do not fit 2 per-sample strengths"):
        schedule.multipliers(torch.zeros(1, 3), torch.tensor([0.5, 0.75]), torch.tensor(0.5), torch.zeros(3))
