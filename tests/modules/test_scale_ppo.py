"""ScalePPOModule (Stage 2): only the scale policy trains, the PPO loss, identity at start, slider checks, export."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.callbacks.sweep_clips import Clip
from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.gain_schedule import GAIN_SCHEDULE, midpoint_log_exponent
from rlmusic_pl.lora import LoRAError, load_lora, lora_parameters, save_lora
from rlmusic_pl.modules import GainSchedule, ScalePPOModule, SliderModule, SweepModule, generate_at_strengths
from rlmusic_pl.modules.slider import generate_with_schedule
from rlmusic_pl.modules.scale_ppo import within_context
from rlmusic_pl.rewards.simple import SpectralCentroidReward

DURATION = 0.5
STEPS = 3
GRID = [0.0, 0.5, 1.0]
PROMPTS = ["A piano melody", "jazz"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slider_dir(tmp_path_factory):
    """A Stage-1 slider as SliderModule exports it: random non-zero LoRA, probe means in the metadata."""
    module = SliderModule(backbone="tiny", duration_s=DURATION)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(module.backbone.unet):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    shape = (4, *module.backbone.latent_shape(DURATION))
    module.attribute_probe.update(torch.randn(shape, generator=generator) + 0.5, torch.randn(shape, generator=generator) - 0.5)
    return save_lora(module.backbone.unet, tmp_path_factory.mktemp("slider") / "stage1", module.adapter_metadata())


def stage2(slider_dir, **kwargs) -> ScalePPOModule:
    args = {"slider": str(slider_dir), "backbone": "tiny", "strengths": GRID, "duration_s": DURATION, "num_steps": STEPS, "init_std": 0.2}
    module = ScalePPOModule(**{**args, **kwargs})
    module.configure_model()
    return module


def prompt_inputs(backbone, seed=1):
    return backbone.encode_prompts(PROMPTS), backbone.initial_latents(len(PROMPTS), DURATION, torch.Generator().manual_seed(seed))


SCHEDULES = [
    {"conditioning": "strength", "per_channel": False},
    {"conditioning": "strength_step", "per_channel": True},
    {"conditioning": "strength", "shared_schedule": True},
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_at_initialisation_stage2_generates_exactly_what_stage1_does(slider_dir, schedule):
    stage1 = AudioLDM2Backbone.load("tiny")
    load_lora(stage1.unet, slider_dir)
    module = stage2(slider_dir, **schedule)
    cond, noise = prompt_inputs(stage1)
    expected = generate_at_strengths(stage1, cond, noise, GRID, STEPS, 3.5)
    assert torch.equal(module.generate(cond, noise, None), expected)
    assert not torch.equal(expected[: len(PROMPTS)], expected[-len(PROMPTS) :])  # the slider does change the output


@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_each_rollout_of_a_batch_runs_its_own_gains(slider_dir, schedule):
    module = stage2(slider_dir, **schedule)
    cond, noise = prompt_inputs(module.backbone)
    actions = module.sample_actions(1, torch.Generator().manual_seed(0))  # a mirrored pair
    both = module.generate(cond[[0, 0]], noise[[0, 0]], actions)
    for row, action in enumerate(actions):
        with torch.no_grad():
            module.gain_schedule.mean.copy_(action)
        alone = module.generate(cond[[0]], noise[[0]], None)
        torch.testing.assert_close(both[row :: 2], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[-2], both[-1], atol=1e-3)  # the two actions differ at strength 1


def test_an_interior_schedule_bends_intermediate_strengths_and_leaves_full_strength_to_stage1(slider_dir):
    module = stage2(slider_dir, conditioning="interior", shared_schedule=True, init_std=0.5)
    cond, noise = prompt_inputs(module.backbone)
    actions = module.sample_actions(1, torch.Generator().manual_seed(0))  # a mirrored pair
    bent = module.generate(cond[[0, 0]], noise[[0, 0]], actions)
    stage1 = module.generate(cond[[0, 0]], noise[[0, 0]], None)
    torch.testing.assert_close(bent[-2:], stage1[-2:], atol=1e-5, rtol=1e-5)  # s = 1
    assert not torch.allclose(bent[2:4], stage1[2:4], atol=1e-3)  # an intermediate strength


def test_a_power_position_schedule_runs_each_clip_at_its_own_power_of_the_strength(slider_dir):
    module = stage2(slider_dir, conditioning="power_position", attribute="centroid", shared_schedule=True)
    with torch.no_grad():
        module.gain_schedule.mean.copy_(torch.tensor([0.2, 0.0, -0.5]))  # strength s ** exp(0.2 - 0.5 q)
    cond, noise = prompt_inputs(module.backbone)
    stage1 = AudioLDM2Backbone.load("tiny")
    load_lora(stage1.unet, slider_dir)
    plain = generate_at_strengths(stage1, cond, noise, GRID, STEPS, 3.5).unflatten(0, (len(GRID), -1))
    at = module.attribute_of(plain.flatten(0, 1)).view(len(GRID), -1)
    exponent = midpoint_log_exponent(at[0], at[1], at[2])
    module.gain_schedule.observe_context(exponent)  # two clips: q = -1 and +1
    q = (exponent - exponent.mean()) / exponent.std(unbiased=False)
    latents = module.generate(cond, noise, None).unflatten(0, (len(GRID), -1))
    torch.testing.assert_close(latents[0], plain[0], atol=1e-5, rtol=1e-5)  # s = 0: the base
    torch.testing.assert_close(latents[2], plain[2], atol=1e-5, rtol=1e-5)  # s = 1: Stage 1
    for prompt in range(len(PROMPTS)):
        strength = 0.5 ** math.exp(0.2 - 0.5 * q[prompt].item())
        alone = generate_at_strengths(stage1, cond[[prompt]], noise[[prompt]], [strength], STEPS, 3.5)
        torch.testing.assert_close(latents[1, prompt], alone[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(latents[1], plain[1], atol=1e-3)
    with pytest.raises(LoRAError, match="reads each clip off the plain slider"):
        generate_with_schedule(module.backbone, cond, noise, GRID, STEPS, 3.5, schedule=module.gain_schedule)


def test_a_clip_aware_stage2_learns_the_attribute_statistics_and_the_sweep_applies_its_export(slider_dir, tmp_path):
    module = stage2(slider_dir, conditioning="power_position", attribute="centroid", shared_schedule=True,
                    export_to=str(tmp_path / "stage2"), ppo_epochs=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, PromptAttributeDataModule(prompts=PROMPTS, batch_size=2))
    schedule = module.gain_schedule
    assert schedule.context_moments[0] == 2 * 2 * 2  # steps x prompts x rollouts per prompt
    center, scale = schedule.context_norm.tolist()
    assert (center, scale) != (0.0, 1.0) and scale > 0  # the clips' log exponents' mean and std, no longer the start
    sweep = SweepModule(adapter=str(tmp_path / "stage2"), backbone="tiny", duration_s=DURATION, num_steps=STEPS)
    sweep.configure_model()
    assert sweep.gain_schedule.settings == {**schedule.settings, "context_center": pytest.approx(center), "context_scale": pytest.approx(scale)}
    clips = [Clip(item, prompt, "", {}, seed=item + 1, strength=0.0) for item, prompt in enumerate(PROMPTS)]
    cond = sweep.backbone.encode_prompts(PROMPTS)
    noise = torch.cat([sweep.backbone.initial_latents(1, DURATION, torch.Generator().manual_seed(c.seed)) for c in clips])
    expected = module.backbone.decode(module.generate(cond, noise, None), DURATION).float()
    torch.testing.assert_close(sweep.generate(clips, GRID), expected, atol=1e-5, rtol=1e-4)


def test_the_centroid_attribute_and_relative_stability_score_the_decoded_audio(slider_dir):
    module = stage2(slider_dir, attribute="centroid", relative_stability=True)
    assert module.reward.rewards["stability"].relative
    cond, noise = prompt_inputs(module.backbone)
    waveforms, rewards, attribute = module.score(module.generate(cond, noise, None))
    expected = SpectralCentroidReward()(waveforms, module.backbone.sample_rate, [""] * len(waveforms), [{}] * len(waveforms))
    torch.testing.assert_close(attribute, expected.view(len(GRID), len(PROMPTS)))
    assert rewards.components["stability"].shape == (len(PROMPTS),)
    with pytest.raises(ValueError, match="attribute must be"):
        stage2(slider_dir, attribute="loudness")


def test_a_shared_schedule_is_a_policy_of_the_conditionings_coefficients_alone(slider_dir):
    assert stage2(slider_dir, conditioning="strength_step", shared_schedule=True).gain_schedule.mean.numel() == 4
    with pytest.raises(ValueError, match="shared_schedule and per_channel"):
        stage2(slider_dir, shared_schedule=True, per_channel=True)


def test_context_advantages_compare_each_rollout_with_those_of_its_prompt_and_noise():
    advantages = within_context(torch.tensor([1.0, 3.0, 10.0, 14.0]), 2)
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])  # the contexts' means 2 and 12 drop out
    torch.testing.assert_close(advantages, centred / centred.std(), atol=1e-5, rtol=1e-5)


def test_a_stage2_step_with_context_advantages_feeds_them_to_the_ppo_loss(slider_dir, tmp_path, monkeypatch):
    module = stage2(slider_dir, rollouts_per_prompt=2, ppo_epochs=1, context_advantages=True)
    seen = []
    ppo_loss = module.ppo_loss
    monkeypatch.setattr(module, "ppo_loss", lambda actions, old, advantages, rewards: seen.append((advantages, rewards)) or ppo_loss(actions, old, advantages, rewards))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, PromptAttributeDataModule(prompts=PROMPTS, batch_size=2))
    advantages, rewards = seen[0]
    torch.testing.assert_close(advantages, within_context(rewards, 2))
    assert advantages.abs().sum() > 0


def test_a_stage2_step_changes_only_the_scale_policy_and_exports_an_adapter_the_sweep_applies(slider_dir, tmp_path):
    module = stage2(slider_dir, export_to=str(tmp_path / "stage2"), rollouts_per_prompt=2, ppo_epochs=2)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    policy = {k: v.clone() for k, v in module.named_parameters() if k.startswith(("gain_schedule.", "log_std", "value"))}
    assert not any(p.requires_grad for p in module.backbone.parameters())  # base, LoRA A/B and Stage-1 gains
    data = PromptAttributeDataModule(prompts=PROMPTS, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)

    # What keeps base, LoRA and Stage-1 gains frozen: no gradient reaches them (the UNet runs without
    # gradients) and the optimizer does not hold them. Comparing their values cannot see a frozen
    # weight handed to the optimizer (it gets no gradient, so no step); these two checks do.
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {k for k, v in module.named_parameters() if id(v) in optimised} == set(policy)
    assert not any(p.requires_grad for p in module.backbone.parameters())
    after = module.backbone.state_dict()
    assert after.keys() == frozen.keys()
    assert [k for k in frozen if not torch.equal(frozen[k], after[k])] == []  # and nothing writes them in place
    changed = [k for k, v in module.named_parameters() if k in policy and not torch.equal(policy[k], v)]
    assert set(changed) == set(policy), changed  # theta, log-std and value all moved
    assert "train/surrogate" in trainer.logged_metrics and "train/value_loss" in trainer.logged_metrics

    exported = tmp_path / "stage2"
    assert (exported / GAIN_SCHEDULE).is_file() and (tmp_path / "adapter" / GAIN_SCHEDULE).is_file()
    sweep = SweepModule(adapter=str(exported), backbone="tiny", duration_s=DURATION, num_steps=STEPS)
    sweep.configure_model()
    assert sweep.adapter_kind == "ScalePPOModule"
    torch.testing.assert_close(sweep.gain_schedule.mean, module.gain_schedule.mean.detach(), rtol=0, atol=0)
    cond, noise = prompt_inputs(sweep.backbone)
    swept = generate_at_strengths(sweep.backbone, cond, noise, GRID, STEPS, 3.5)
    assert torch.equal(swept, module.generate(cond, noise, None))
    stage1 = AudioLDM2Backbone.load("tiny")
    load_lora(stage1.unet, slider_dir)
    assert not torch.equal(swept, generate_at_strengths(stage1, cond, noise, GRID, STEPS, 3.5))


def test_ppo_loss_equals_a_hand_computed_value(tmp_path):
    module = ScalePPOModule(slider=str(tmp_path), backbone="tiny", clip_range=0.2, value_coef=0.5, entropy_coef=0.01, gain_penalty=0.1)
    module.gain_schedule = GainSchedule({"a": 1, "b": 1}, conditioning="strength")  # D = 4, no backbone needed
    mean, std, value = [0.1, -0.2, 0.0, 0.3], 0.5, 0.2
    with torch.no_grad():
        module.gain_schedule.mean.copy_(torch.tensor(mean))
        module.log_std.fill_(math.log(std))
        module.value.fill_(value)
    actions = [[0.3, -0.1, 0.2, 0.1], [-0.2, -0.4, 0.1, 0.6], [0.1, -0.2, 0.0, 0.3]]
    old_log_prob = [-1.0, -2.5, 0.0]
    advantages = [1.0, -0.5, 2.0]
    rewards = [0.5, 0.1, 0.9]

    def log_prob(action):
        return sum(-((a - m) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi) for a, m in zip(action, mean))

    surrogate = 0.0
    for action, old, advantage in zip(actions, old_log_prob, advantages):
        ratio = math.exp(log_prob(action) - old)
        surrogate += max(-advantage * ratio, -advantage * min(max(ratio, 0.8), 1.2)) / 3
    value_loss = sum((value - r) ** 2 for r in rewards) / 3
    entropy = 0.5 + 0.5 * math.log(2 * math.pi) + math.log(std)
    penalty = sum(m**2 for m in mean) / 4
    expected = surrogate + 0.5 * value_loss - 0.01 * entropy + 0.1 * penalty

    terms = module.ppo_loss(torch.tensor(actions), torch.tensor(old_log_prob), torch.tensor(advantages), torch.tensor(rewards))
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms.surrogate.item() == pytest.approx(surrogate, rel=1e-5)
    assert terms.clipfrac.item() == pytest.approx(2 / 3)  # ratios 0.85, 3.1 (clipped) and 0.40 (clipped)


@pytest.mark.parametrize("override, field", [({"lora_rank": 8}, "rank 4"), ({"lora_targets": "attention"}, "targets 'self_attention'"),
                                             ({"lora_alpha": 1.0}, "alpha 4.0")])
def test_a_slider_with_other_lora_settings_is_a_clear_error(slider_dir, override, field):
    with pytest.raises(LoRAError, match=rf"slider {slider_dir}: its LoRA has {field}"):
        stage2(slider_dir, **override)


def test_a_directory_that_is_not_a_slider_is_a_clear_error(tmp_path):
    with pytest.raises(LoRAError, match=f"{tmp_path / 'missing'}: no such adapter directory"):
        stage2(tmp_path / "missing")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gathers_every_ranks_rollouts_and_keeps_the_gains_identical(slider_dir, tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "scale_ppo_ddp.py"), "2", str(slider_dir), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for step in range(2):
        own = [rank["own_actions"][step] for rank in ranks]
        assert not torch.allclose(own[0], own[1])  # each rank generated its own rollouts
        for rank in ranks:  # and every update used all of them, in rank order, with the same rewards
            torch.testing.assert_close(rank["actions"][step], torch.cat(own), rtol=0, atol=0)
            torch.testing.assert_close(rank["rewards"][step], ranks[0]["rewards"][step], rtol=0, atol=0)
        assert ranks[0]["rewards"][step].numel() == 2 * 2  # ranks x rollouts per prompt (one prompt per rank)
    for name in ("theta", "log_std", "value", "context_moments"):
        torch.testing.assert_close(ranks[0]["after"][name], ranks[1]["after"][name], rtol=0, atol=0)
        assert not torch.equal(ranks[0]["after"][name], ranks[0]["before"][name])  # they did train
    assert ranks[0]["after"]["context_moments"][0] == 2 * 2 * 2  # every rank's unsteered clips of both steps
