"""DDPOModule in real Lightning runs on the tiny backbone: the policy identity, resume, bad rewards, DDP on two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from policy_identity import SampledBatch, check_policy_identity
from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.audio import OutputPathError
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules import CheckpointError, DDPOModule
from rlmusic_pl.rewards import CallableReward, EmotionReward, Reward, RewardError, SpectralCentroidReward

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(backbone="tiny", duration_s=0.5, num_steps=3, samples_per_prompt=2, sample_batch_size=4, train_batch_size=2,
            stat_min_count=2, learning_rate=1e-3, clip_range=0.2)


def data(**kwargs) -> PromptAttributeDataModule:
    return PromptAttributeDataModule(
        template="a {emotion} piano", template_values={"emotion": ["happy", "sad"]}, negative_prompt="noise", batch_size=2, **kwargs
    )


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())


def trainer(tmp_path, max_epochs: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", max_epochs=max_epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


class ReplayDDPO(DDPOModule):
    """DDPOModule whose training step trains on given rollouts and records each step's recomputed log-prob."""

    replay = None  # Rollouts to train on instead of sampling; None: sample as usual
    recomputed = None  # [samples, steps], filled by the training pass

    def sample_rollouts(self, batch, generator):
        return super().sample_rollouts(batch, generator) if self.replay is None else self.replay

    def step_log_prob(self, rollouts, rows, step_index, distribution=None):
        log_prob = super().step_log_prob(rollouts, rows, step_index, distribution)
        assert self.recomputed[rows, step_index].isnan().all(), "a step was trained twice before the optimizer step"
        self.recomputed[rows, step_index] = log_prob.detach()
        return log_prob


def test_the_training_pass_scores_exactly_the_policy_that_sampled(tmp_path):
    # Three prompts, each with its own negative prompt, two samples each: minibatches of 4 (every order
    # is shuffled) mix prompts; guidance on; one optimizer step, after every step has been scored.
    prompts, negatives = ["a happy piano", "a sad violin", "an angry drum"], ["noise", "low quality", "a choir"]
    module = ReplayDDPO(SpectralCentroidReward(), **{**TINY, "train_batch_size": 4, "gradient_accumulation": 2, "clip_range": 1e-4})
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    for param in lora_parameters(module.backbone.unet):  # a LoRA that acts, as it does after training
        param.data = 0.2 * torch.randn(param.shape, generator=generator)

    def sample() -> SampledBatch:
        batch = {"prompt": prompts, "negative_prompt": negatives, "attributes": [{}] * 3}
        rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(1))
        negative_prompts = [n for n in negatives for _ in range(module.hparams.samples_per_prompt)]
        return SampledBatch(rollouts.prompts, negative_prompts, rollouts.log_probs, rollouts)

    def recompute(sampled: SampledBatch) -> torch.Tensor:
        module.replay, module.recomputed = sampled.state, torch.full_like(sampled.log_probs, float("nan"))
        data = PromptAttributeDataModule(prompts=prompts, batch_size=3)
        trainer(tmp_path, 1, max_steps=1, enable_checkpointing=False).fit(module, data)
        return module.recomputed

    check_policy_identity(sample, recompute, clip_range=module.hparams.clip_range)


def test_resumed_training_gives_the_same_next_step_loss(tmp_path):
    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", 3, callbacks=[uninterrupted], enable_checkpointing=False).fit(DDPOModule(SpectralCentroidReward(), **TINY), data())

    first = trainer(tmp_path / "b", 2)
    first.fit(DDPOModule(SpectralCentroidReward(), **TINY), data())
    checkpoint = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = LossRecorder()
    trainer(tmp_path / "b", 3, callbacks=[resumed], enable_checkpointing=False).fit(
        DDPOModule(SpectralCentroidReward(), **TINY), data(), ckpt_path=checkpoint
    )
    assert len(uninterrupted.losses) == 3 and len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(uninterrupted.losses[2], rel=1e-5, abs=1e-7)
    assert resumed.losses[0] != pytest.approx(uninterrupted.losses[1], rel=1e-3)


def test_checkpoint_holds_trainable_state_and_ddpo_state_only(tmp_path):
    trainer(tmp_path, 1).fit(DDPOModule(SpectralCentroidReward(), **TINY), data())
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["state_dict"] and all(".lora_" in k or ".rl_scale." in k for k in checkpoint["state_dict"])
    assert set(checkpoint["ddpo"]["stat_tracker"]["buffers"]) == {"a happy piano", "a sad piano"}
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_from_a_checkpoint_without_lora_is_an_error(tmp_path):
    trainer(tmp_path, 1).fit(DDPOModule(SpectralCentroidReward(), **TINY), data())
    path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"] = {}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="lacks"):
        trainer(tmp_path, 2).fit(DDPOModule(SpectralCentroidReward(), **TINY), data(), ckpt_path=path)


class NaNReward(Reward):
    def __init__(self) -> None:
        super().__init__("broken_judge")

    def forward(self, waveforms, sample_rate, prompts, attributes):
        values = torch.zeros(waveforms.shape[0])
        values[0] = float("nan")
        return values


def test_a_nan_reward_stops_training_with_an_error_naming_the_reward(tmp_path):
    module = DDPOModule(NaNReward(), **TINY)
    with pytest.raises(RewardError, match="broken_judge.*NaN"):
        trainer(tmp_path, 1).fit(module, data())


def test_monitor_rewards_are_logged_but_not_optimised(tmp_path):
    from rlmusic_pl.rewards import LoudnessReward

    module = DDPOModule(SpectralCentroidReward(), monitor_rewards=[LoudnessReward()], **TINY)
    run = trainer(tmp_path, 1)
    run.fit(module, data())
    assert "train/reward/monitor/loudness" in run.callback_metrics
    assert "train/reward/total" in run.callback_metrics


class GivenValues(Reward):
    """A reward whose values the test sets (``values``), whatever the audio."""

    def __init__(self, name: str, values: torch.Tensor) -> None:
        super().__init__(name)
        self.values = values

    def forward(self, waveforms, sample_rate, prompts, attributes):
        return self.values.clone()


def test_changing_a_monitor_rewards_values_changes_neither_advantages_nor_loss():
    monitor = GivenValues("judge", torch.zeros(4))
    module = DDPOModule(SpectralCentroidReward(), monitor_rewards=[monitor], **{**TINY, "stat_min_count": 16})
    module.configure_model()
    batch = {"prompt": ["a happy piano", "a sad piano"], "negative_prompt": ["noise"] * 2, "attributes": [{}, {}]}
    rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(0))
    module.backbone.set_timesteps(module.hparams.num_steps)
    minibatch = torch.tensor([0, 3])
    fresh_statistics = module.stat_tracker.state_dict()
    results = []
    for values in (torch.tensor([0.9, 0.1, 0.4, 0.7]), torch.tensor([0.2, 0.8, 0.6, 0.0])):  # the same samples, judged anew
        monitor.values = values
        module.stat_tracker.load_state_dict(fresh_statistics)
        rollouts.rewards = module.score(rollouts.waveforms, rollouts.prompts, rollouts.attributes)
        rollouts.advantages = module.compute_advantages(rollouts)
        loss = module.step_loss(rollouts, minibatch, torch.ones_like(minibatch)).loss.detach()
        results.append((rollouts.rewards.components["monitor/judge"], rollouts.advantages, loss))
    (judged, advantages, loss), (judged_again, advantages_again, loss_again) = results
    assert not torch.equal(judged, judged_again)  # the monitor's values did change (and are what is logged)
    assert advantages.abs().sum() > 0 and loss != 0
    assert torch.equal(advantages_again, advantages)
    assert torch.equal(loss_again, loss)


def level(waveforms, sample_rate, prompts, attributes):
    return waveforms.abs().mean(dim=1)


def test_a_plain_function_is_a_reward_and_a_monitor_reward(tmp_path):
    module = DDPOModule(level, monitor_rewards=[level], **TINY)
    assert isinstance(module.reward, CallableReward)
    run = trainer(tmp_path, 1)
    run.fit(module, data())
    assert "train/reward/level" in run.callback_metrics and "train/reward/monitor/level" in run.callback_metrics


def test_an_export_to_that_cannot_be_written_is_refused_before_the_backbone_loads(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    module = DDPOModule(SpectralCentroidReward(), export_to=str(blocker / "adapter"), **TINY)
    with pytest.raises(OutputPathError, match=r"export_to .*a_file/adapter: cannot write there .*choose another export_to"):
        trainer(tmp_path, 1).fit(module, data())
    assert module.backbone is None


def test_a_monitor_reward_needing_an_attribute_some_prompts_lack_is_refused_before_the_backbone_loads(tmp_path):
    module = DDPOModule(SpectralCentroidReward(), monitor_rewards=[EmotionReward(n_channels=8)], **TINY)
    sad = {"prompt": "a sad piano", "attributes": {"emotion": "sad"}}
    prompts = PromptAttributeDataModule(prompts=[sad, "a piano"], batch_size=2)
    with pytest.raises(RewardError, match="train prompts: reward 'emotion': prompt 'a piano' has no 'emotion' attribute"):
        trainer(tmp_path, 1).fit(module, prompts)
    assert module.backbone is None


def test_group_advantages_need_several_samples_per_prompt():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        DDPOModule(SpectralCentroidReward(), advantage="group", samples_per_prompt=1, backbone="tiny")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_ranks_in_agreement(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "RANK_STATE_DIR": str(tmp_path)}
    command = [
        sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(ROOT / "configs/tiny/ddpo_centroid.yaml"),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.limit_val_batches=0", "--trainer.callbacks+=ddp_rank_state.RankState", "--trainer.enable_progress_bar=false",
        "--model.duration_s=0.5", "--model.num_steps=3", "--model.stat_min_count=2", "--data.batch_size=1",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["stat_tracker"] == states[1]["stat_tracker"]  # gathered prompts and rewards
    assert sum(len(v) for v in states[0]["stat_tracker"]["buffers"].values()) == 2 * 2 * 2 * 2  # ranks x prompts x samples x epochs
    assert states[0]["lora_sum"] == pytest.approx(states[1]["lora_sum"], rel=1e-6)  # synchronised gradients
    assert states[0]["lora_sum"] != pytest.approx(states[0]["lora_sum_at_start"], rel=1e-6)  # and they did train


@pytest.mark.slow
def test_two_ranks_with_half_the_samples_each_make_the_update_of_one_process_with_all(tmp_path):
    from fixed_update import check_two_ranks_make_the_update_of_one_process

    check_two_ranks_make_the_update_of_one_process("ddpo", tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_mixed_precision_keeps_lora_weights_in_float32(tmp_path):
    module = DDPOModule(SpectralCentroidReward(), **TINY)
    run = trainer(tmp_path, 1, precision="bf16-mixed")
    run.fit(module, data())
    assert all(p.dtype == torch.float32 for p in lora_parameters(module.backbone.unet))
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = {"prompt": ["a happy piano", "a sad piano"], "negative_prompt": ["noise"] * 2, "attributes": [{}, {}]}
    gradients, inner_calls = [], []
    for checkpointing in (False, True):
        module = DDPOModule(SpectralCentroidReward(), gradient_checkpointing=checkpointing, **TINY)
        module.configure_model()
        calls = []
        rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(0))
        rollouts.advantages = module.compute_advantages(rollouts)
        module.backbone.set_timesteps(module.hparams.num_steps)
        rows = torch.arange(len(rollouts.prompts))
        module.backbone.unet.down_blocks[1].resnets[0].register_forward_hook(lambda *_: calls.append(1))
        module.step_loss(rollouts, rows, torch.ones_like(rows)).loss.backward()
        inner_calls.append(len(calls))
        gradients.append(torch.cat([p.grad.flatten() for p in lora_parameters(module.backbone.unet)]))
    assert inner_calls == [1, 2]  # recomputed in the backward pass
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-7)


def test_kl_to_reference_equals_a_hand_computation_and_is_zero_for_a_fresh_lora():
    module = DDPOModule(SpectralCentroidReward(), kl_coef=0.5, **{**TINY, "eta": 0.7})
    module.configure_model()
    batch = {"prompt": ["a happy piano", "a sad piano"], "negative_prompt": ["noise"] * 2, "attributes": [{}, {}]}
    rollouts = module.sample_rollouts(batch, torch.Generator().manual_seed(0))
    rollouts.advantages = torch.zeros(4)  # the surrogate is then 0: the loss is the KL term alone
    scheduler = module.backbone.scheduler
    scheduler.set_timesteps(module.hparams.num_steps)
    rows, steps = torch.arange(4), torch.tensor([0, 1, 2, 1])
    fresh = module.step_loss(rollouts, rows, steps)
    assert fresh.kl_to_reference == 0 and fresh.loss == 0  # LoRA B starts at 0: the policy is the reference

    generator = torch.Generator().manual_seed(1)
    for param in lora_parameters(module.backbone.unet):
        param.data = 0.2 * torch.randn(param.shape, generator=generator)
    terms = module.step_loss(rollouts, rows, steps)
    by_hand = []
    for row, step in zip(rows.tolist(), steps.tolist()):
        x_t, t = rollouts.latents[row : row + 1, step], rollouts.timesteps[step]
        a_t = scheduler.alphas_cumprod[t]
        prev = t - 1000 // module.hparams.num_steps
        a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        sigma = 0.7 * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        means = []
        for strength in (1.0, 0.0):
            with torch.no_grad(), lora_strength(module.backbone.unet, strength):
                eps = module.backbone.predict_noise(x_t, t, rollouts.cond[[row]], module.hparams.guidance_scale)
            x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            means.append(a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps)
        by_hand.append(((means[0] - means[1]) ** 2).sum() / (2 * sigma**2))
    by_hand = torch.stack(by_hand)
    assert by_hand.min() > 0
    torch.testing.assert_close(terms.kl_to_reference, by_hand.mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(terms.loss, 0.5 * by_hand.mean(), rtol=1e-4, atol=0)
    terms.loss.backward()  # the KL pulls the LoRA back: it has a gradient (the reference pass has none)
    assert sum(p.grad.abs().sum() for p in lora_parameters(module.backbone.unet)) > 0


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_kl_to_reference_is_logged_whatever_its_weight(tmp_path, kl_coef):
    module = DDPOModule(SpectralCentroidReward(), kl_coef=kl_coef, **{**TINY, "inner_epochs": 2})
    run = trainer(tmp_path, 1, enable_checkpointing=False)
    run.fit(module, data())
    kl = run.callback_metrics["train/kl_to_reference"]
    assert torch.isfinite(kl) and kl > 0  # the second inner epoch trains a LoRA the first one moved
