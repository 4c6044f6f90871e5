"""MusicRLModule on the tiny MusicGen: the policy identity under guidance, the loss against a brute-force
computation, the exact KL, each baseline, monitor rewards, NaN rewards, resume, the CLI and DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from policy_identity import SampledBatch, check_policy_identity
from rlmusic_pl.cli import main
from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules import CheckpointError, MusicRLModule
from rlmusic_pl.modules.advantages import leave_one_out_advantages
from rlmusic_pl.rewards import LoudnessReward, Reward, RewardError, SpectralCentroidReward
from test_cli import undocumented_options

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "musicrl_clap.yaml"
TINY = dict(backbone="tiny", text_length=16, duration_s=0.1, guidance_scale=3.0, temperature=0.99, top_k=20, samples_per_prompt=2,
            sample_batch_size=4, train_batch_size=2, stat_min_count=2, learning_rate=1e-2, kl_coef=0.2, lora_rank=2)
PROMPTS = ["a bright C note", "a dull G note"]
BATCH = {"prompt": PROMPTS, "attributes": [{}, {}]}


def data(**kwargs) -> PromptAttributeDataModule:
    return PromptAttributeDataModule(prompts=PROMPTS, batch_size=2, **kwargs)


def trainer(tmp_path, max_epochs: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", max_epochs=max_epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def acting_module(**settings) -> MusicRLModule:
    """A configured module whose decoder reads its text strongly and whose LoRA acts, as after training.

    The random tiny decoder barely reads its text (see tests/backbone/test_musicgen.py), so mixed-up
    conditioning would go unseen without the amplified cross-attention.
    """
    module = MusicRLModule(SpectralCentroidReward(), **{**TINY, **settings})
    module.configure_model()
    for layer in module.backbone.decoder.model.decoder.layers:
        layer.encoder_attn.out_proj.weight.data *= 20
    generator = torch.Generator().manual_seed(0)
    for param in lora_parameters(module.backbone.decoder):
        param.data = 0.3 * torch.randn(param.shape, generator=generator)
    return module


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())


# ------------------------------------------------------------------------------ the policy and the loss
class ReplayMusicRL(MusicRLModule):
    """MusicRLModule whose training step trains on given rollouts and records the log-probs its training pass computes."""

    replay = None
    recomputed = None  # [samples, K, F], filled by the training pass

    def sample_rollouts(self, batch, generator):
        return super().sample_rollouts(batch, generator) if self.replay is None else self.replay

    def policy_scores(self, rollouts, rows):
        scores = super().policy_scores(rollouts, rows)
        assert self.recomputed[rows].isnan().all(), "a sample was scored twice before the optimizer step"
        self.recomputed[rows] = scores.log_probs.detach()
        return scores


def test_the_training_pass_scores_exactly_the_policy_that_sampled(tmp_path):
    # Three prompts, two samples each, guidance on; minibatches of 4 (shuffled) mix prompts; one optimizer step.
    prompts = ["a bright C note", "a dull G note", "a loud drum"]
    module = ReplayMusicRL(SpectralCentroidReward(), **{**TINY, "train_batch_size": 4, "gradient_accumulation": 2, "duration_s": 0.2})
    module.configure_model()
    acting = acting_module()
    module.backbone.load_state_dict(acting.backbone.state_dict())

    def sample() -> SampledBatch:
        rollouts = module.sample_rollouts({"prompt": prompts, "attributes": [{}] * 3}, torch.Generator().manual_seed(1))
        return SampledBatch(rollouts.prompts, None, rollouts.log_probs, rollouts)

    def recompute(sampled: SampledBatch) -> torch.Tensor:
        module.replay, module.recomputed = sampled.state, torch.full_like(sampled.log_probs, float("nan"))
        trainer(tmp_path, 1, max_steps=1, enable_checkpointing=False).fit(module, PromptAttributeDataModule(prompts=prompts, batch_size=3))
        return module.recomputed

    check_policy_identity(sample, recompute, clip_range=1e-4)


def delayed_inputs(codes: torch.Tensor, pad: int) -> torch.Tensor:
    """The decoder's input [B, K, F + K - 1]: position j of codebook k holds code (k, j - k - 1), else pad."""
    batch, codebooks, frames = codes.shape
    tokens = torch.full((batch, codebooks, frames + codebooks - 1), pad)
    for k in range(codebooks):
        for j in range(frames + codebooks - 1):
            if 0 <= j - k - 1 < frames:
                tokens[:, k, j] = codes[:, k, j - k - 1]
    return tokens


def brute_force_distributions(module: MusicRLModule, codes: torch.Tensor, prompts: list[str], top_k: int | None) -> torch.Tensor:
    """log pi(. | s) [B, K, F, V] from transformers' own decoder forward, guidance and temperature written out."""
    hp, backbone = module.hparams, module.backbone
    tokens = delayed_inputs(codes, backbone.pad_token)
    cond = backbone.encode_prompts(prompts)
    batch, codebooks, frames = codes.shape

    def logits(states, mask):
        out = backbone.decoder(input_ids=tokens.reshape(-1, tokens.shape[-1]), encoder_hidden_states=states, encoder_attention_mask=mask)
        return out.logits.reshape(batch, codebooks, -1, backbone.codebook_size).float()

    conditional = logits(cond.hidden_states, cond.attention_mask)
    unconditional = logits(torch.zeros_like(cond.hidden_states), torch.zeros_like(cond.attention_mask))
    scores = (unconditional + hp.guidance_scale * (conditional - unconditional)) / hp.temperature
    # Output j + k of codebook k predicts code (k, j).
    scores = torch.stack([scores[:, k, k : k + frames] for k in range(codebooks)], dim=1)
    if top_k:
        kth = scores.sort(-1, descending=True).values[..., top_k - 1 : top_k]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.log_softmax(scores, -1)


@pytest.mark.parametrize("clip_range", [None, 0.05])
def test_the_loss_equals_a_brute_force_computation_on_a_fixed_batch(clip_range):
    module = acting_module(baseline="value", clip_range=clip_range, value_loss_coef=0.5)
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(2))
    rollouts.advantages = torch.tensor([0.9, 0.1, 0.4, 0.7])  # the returns
    # Old log-probs off the current policy, so that some ratios leave the clip range.
    rollouts.log_probs = rollouts.log_probs + 0.1 * torch.randn(rollouts.log_probs.shape, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([3, 0])
    terms = module.loss_terms(rollouts, rows)

    codes, prompts = rollouts.codes[rows], [rollouts.prompts[i] for i in rows]
    with torch.no_grad():
        policy = brute_force_distributions(module, codes, prompts, module.hparams.top_k)
        uncut = brute_force_distributions(module, codes, prompts, None)
        with lora_strength(module.backbone.decoder, 0.0):
            reference = brute_force_distributions(module, codes, prompts, None)
        hidden = module.backbone.log_probs(codes, module.backbone.encode_prompts(prompts), 3.0, 0.99, 20, return_hidden_states=True).hidden_states
        values = module.value_head(hidden)[..., 0]
    eps = clip_range if clip_range is not None else float("inf")
    batch, codebooks, frames = codes.shape
    policy_loss = kl = value_loss = 0.0
    for i in range(batch):
        ret = float(rollouts.advantages[rows[i]])
        for k in range(codebooks):
            for f in range(frames):
                new = float(policy[i, k, f, codes[i, k, f]])
                ratio = torch.tensor(new - float(rollouts.log_probs[rows[i], k, f])).exp().item()
                advantage = ret - float(values[i, k, f])
                policy_loss += max(-advantage * ratio, -advantage * min(max(ratio, 1 - eps), 1 + eps)) / batch
                kl += sum(uncut[i, k, f, v].exp().item() * (uncut[i, k, f, v].item() - reference[i, k, f, v].item())
                          for v in range(module.backbone.codebook_size)) / batch
                value_loss += (ret - float(values[i, k, f])) ** 2 / (batch * codebooks * frames)
    assert kl > 1e-3 and value_loss > 0
    alpha = module.hparams.kl_coef
    assert terms.policy_loss.item() == pytest.approx(policy_loss, rel=1e-4, abs=1e-5)
    assert terms.kl.item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert terms.value_loss.item() == pytest.approx(value_loss, rel=1e-5)
    assert terms.loss.item() == pytest.approx((1 - alpha) * policy_loss + alpha * kl + 0.5 * value_loss, rel=1e-4, abs=1e-5)
    if clip_range is not None:
        assert 0 < terms.clipfrac < 1


def test_with_a_fresh_lora_the_kl_is_zero_and_the_loss_is_the_policy_gradient_term():
    module = MusicRLModule(SpectralCentroidReward(), **{**TINY, "baseline": "rloo"})
    module.configure_model()
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(0))
    rollouts.advantages = module.compute_advantages(rollouts)
    terms = module.loss_terms(rollouts, torch.arange(4))
    assert terms.kl.item() == 0.0
    assert terms.approx_kl.item() == pytest.approx(0.0, abs=1e-10)
    assert terms.loss.item() == pytest.approx((1 - module.hparams.kl_coef) * terms.policy_loss.item(), rel=1e-6)
    # With a unit ratio the policy term is -sum_t A = -A * K * F per sample.
    positions = rollouts.codes.shape[1] * rollouts.codes.shape[2]
    assert terms.policy_loss.item() == pytest.approx(-(rollouts.advantages.mean() * positions).item(), abs=1e-4)
    terms.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(module.backbone.decoder))


class GivenValues(Reward):
    """A reward whose values the test sets (``values``), whatever the audio."""

    def __init__(self, name: str, values: torch.Tensor) -> None:
        super().__init__(name)
        self.values = values

    def forward(self, waveforms, sample_rate, prompts, attributes):
        return self.values.clone()


REWARDS = torch.tensor([1.0, 3.0, 2.0, 6.0])  # prompt 0: samples 0, 1; prompt 1: samples 2, 3


@pytest.mark.parametrize("baseline, expected", [
    ("value", REWARDS),  # the return; the value head's prediction is subtracted per position in the loss
    ("rloo", torch.tensor([-2.0, 2.0, -4.0, 4.0])),
    ("group", torch.tensor([-1.0, 1.0, -1.0, 1.0])),
    ("batch", (REWARDS - 3.0) / REWARDS.std(unbiased=False)),
    ("per_prompt", (REWARDS - 3.0) / REWARDS.std(unbiased=False)),  # fewer than stat_min_count rewards per prompt yet: the batch's
])
def test_each_baseline_gives_its_advantages(baseline, expected):
    module = MusicRLModule(GivenValues("given", REWARDS), **{**TINY, "baseline": baseline, "stat_min_count": 4})
    module.configure_model()
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(0))
    torch.testing.assert_close(module.compute_advantages(rollouts), expected, rtol=1e-5, atol=1e-5)
    assert (module.value_head is not None) == (baseline == "value")


def test_per_prompt_statistics_take_over_once_a_prompt_has_enough_rewards():
    module = MusicRLModule(GivenValues("given", REWARDS), **{**TINY, "baseline": "per_prompt", "stat_min_count": 4})
    module.configure_model()
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(0))
    module.compute_advantages(rollouts)
    # Now each prompt has 4 rewards: its own two values, twice (mean 2, std 1 and mean 4, std 2).
    torch.testing.assert_close(module.compute_advantages(rollouts), torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=1e-5, atol=1e-5)


def test_leave_one_out_needs_groups():
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        MusicRLModule(SpectralCentroidReward(), baseline="rloo", samples_per_prompt=1, backbone="tiny")


def test_the_value_head_learns_the_return():
    module = acting_module(baseline="value", learning_rate=0.0, value_learning_rate=0.05)
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(0))
    rollouts.advantages = torch.tensor([0.5, 0.5, 0.5, 0.5])
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(100):
        terms = module.loss_terms(rollouts, torch.arange(4))
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
        losses.append(terms.value_loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_changing_a_monitor_rewards_values_changes_neither_advantages_nor_loss():
    monitor = GivenValues("judge", torch.zeros(4))
    module = MusicRLModule(GivenValues("given", REWARDS), monitor_rewards=[monitor], **{**TINY, "baseline": "per_prompt", "stat_min_count": 16})
    module.configure_model()
    rollouts = module.sample_rollouts(BATCH, torch.Generator().manual_seed(0))
    fresh = module.stat_tracker.state_dict()
    results = []
    for values in (torch.tensor([0.9, 0.1, 0.4, 0.7]), torch.tensor([0.2, 0.8, 0.6, 0.0])):
        monitor.values = values
        module.stat_tracker.load_state_dict(fresh)
        rollouts.rewards = module.score(rollouts.waveforms, rollouts.prompts, rollouts.attributes)
        rollouts.advantages = module.compute_advantages(rollouts)
        loss = module.loss_terms(rollouts, torch.tensor([0, 3])).loss.detach()
        results.append((rollouts.rewards.components["monitor/judge"], rollouts.advantages, loss))
    (judged, advantages, loss), (judged_again, advantages_again, loss_again) = results
    assert not torch.equal(judged, judged_again)
    assert advantages.abs().sum() > 0 and loss != 0
    assert torch.equal(advantages_again, advantages) and torch.equal(loss_again, loss)


class NaNReward(Reward):
    def __init__(self) -> None:
        super().__init__("broken_judge")

    def forward(self, waveforms, sample_rate, prompts, attributes):
        values = torch.zeros(waveforms.shape[0])
        values[1] = float("nan")
        return values


def test_a_nan_reward_stops_training_with_an_error_naming_the_reward(tmp_path):
    with pytest.raises(RewardError, match="broken_judge.*NaN"):
        trainer(tmp_path, 1).fit(MusicRLModule(NaNReward(), **TINY), data())


# ------------------------------------------------------------------------------ runs
def test_fit_logs_the_diagnostics_and_monitor_rewards(tmp_path):
    run = trainer(tmp_path, 1, enable_checkpointing=False)
    run.fit(MusicRLModule(SpectralCentroidReward(), monitor_rewards=[LoudnessReward()], **{**TINY, "clip_range": 0.2, "inner_epochs": 2}), data())
    logged = set(run.callback_metrics)
    assert {"train/loss", "train/kl", "train/entropy", "train/policy_loss", "train/value_loss", "train/explained_variance",
            "train/approx_kl", "train/clipfrac", "train/reward/total", "train/reward/monitor/loudness"} <= logged
    assert run.callback_metrics["train/kl"] > 0  # the second inner epoch ran after an update


def test_resumed_training_gives_the_same_next_step_loss(tmp_path):
    settings = {**TINY, "baseline": "per_prompt"}
    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", 3, callbacks=[uninterrupted], enable_checkpointing=False).fit(MusicRLModule(SpectralCentroidReward(), **settings), data())
    trainer(tmp_path / "b", 2).fit(MusicRLModule(SpectralCentroidReward(), **settings), data())
    checkpoint = next((tmp_path / "b").rglob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)
    assert set(saved["musicrl"]["stat_tracker"]["buffers"]) == set(PROMPTS) and saved["musicrl"]["epochs_sampled"] == 2
    resumed = LossRecorder()
    trainer(tmp_path / "b", 3, callbacks=[resumed], enable_checkpointing=False).fit(
        MusicRLModule(SpectralCentroidReward(), **settings), data(), ckpt_path=checkpoint
    )
    assert len(uninterrupted.losses) == 3 and len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(uninterrupted.losses[2], rel=1e-5, abs=1e-7)
    assert resumed.losses[0] != pytest.approx(uninterrupted.losses[1], rel=1e-3)


def test_the_value_head_is_checkpointed_and_required(tmp_path):
    trainer(tmp_path, 1).fit(MusicRLModule(SpectralCentroidReward(), **TINY), data())
    path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    assert {"value_head.weight", "value_head.bias"} <= set(checkpoint["state_dict"])
    assert all(".lora_" in k or ".rl_scale." in k or k.startswith("value_head.") for k in checkpoint["state_dict"])
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("value_head.")}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="lacks"):
        trainer(tmp_path, 2).fit(MusicRLModule(SpectralCentroidReward(), **TINY), data(), ckpt_path=path)


def test_mixed_precision_keeps_the_lora_and_value_head_in_float32(tmp_path):
    module = MusicRLModule(SpectralCentroidReward(), **TINY)
    run = trainer(tmp_path, 1, precision="bf16-mixed", enable_checkpointing=False)
    run.fit(module, data())
    assert all(p.dtype == torch.float32 for p in [*lora_parameters(module.backbone.decoder), *module.value_head.parameters()])
    assert torch.isfinite(run.callback_metrics["train/loss"]) and torch.isfinite(run.callback_metrics["train/kl"])


def test_every_argument_is_documented_in_the_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlmusic_pl"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY_CONFIG), "--model.help", "rlmusic_pl.modules.MusicRLModule"])
    out = capsys.readouterr().out
    assert "--model.kl_coef" in out and "--model.baseline" in out
    assert undocumented_options(out, "--model.") == {}


@pytest.mark.slow
def test_the_tiny_config_fits_end_to_end_with_reward_and_kl_curves_audio_and_the_reward_kl_plot(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(TINY_CONFIG), f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--model.duration_s=0.3", f"--model.export_to={tmp_path / 'exported'}"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "lightning_logs").iterdir()
    assert (run_dir / "reward_vs_kl.png").read_bytes().startswith(b"\x89PNG")
    rows = (run_dir / "reward_vs_kl.csv").read_text().splitlines()
    assert rows[0] == "step,kl,reward" and len(rows) == 1 + 3
    events = EventAccumulator(str(run_dir), size_guidance={"audio": 0}).Reload()
    assert {"train/reward/total", "train/kl", "train/reward/monitor/spectral_centroid"} <= set(events.Tags()["scalars"])
    assert events.Tags()["audio"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()  # where configs/tiny/musicgen_sweep.yaml reads it


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_ranks_in_agreement(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "RANK_STATE_DIR": str(tmp_path)}
    command = [
        sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(TINY_CONFIG), "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}", f"--model.export_to={tmp_path / 'exported'}", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=ddp_rank_state.RankState", "--trainer.enable_progress_bar=false", "--model.duration_s=0.2",
        "--model.baseline=per_prompt", "--model.stat_min_count=2", "--data.batch_size=1",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["stat_tracker"] == states[1]["stat_tracker"]  # gathered prompts and rewards
    assert sum(len(v) for v in states[0]["stat_tracker"]["buffers"].values()) == 2 * 1 * 2 * 2  # ranks x prompts x samples x epochs
    assert states[0]["lora_sum"] == pytest.approx(states[1]["lora_sum"], rel=1e-6)  # synchronised gradients
    assert states[0]["lora_sum"] != pytest.approx(states[0]["lora_sum_at_start"], rel=1e-6)


@pytest.mark.slow
def test_two_ranks_with_half_the_samples_each_make_the_update_of_one_process_with_all(tmp_path):
    from fixed_update import check_two_ranks_make_the_update_of_one_process

    check_two_ranks_make_the_update_of_one_process("musicrl", tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
