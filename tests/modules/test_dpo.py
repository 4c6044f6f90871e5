"""DiffusionDPOModule on the tiny backbone: the loss by hand, log 2 with a fresh LoRA, resume, bf16, DDP, the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.audio import write_wav
from rlmusic_pl.data.preferences import PreferenceDataError, PreferencePairs
from rlmusic_pl.lora import lora_parameters, lora_strength
from rlmusic_pl.modules import CheckpointError, DiffusionDPOModule
from rlmusic_pl.modules.dpo import dpo_loss
from rlmusic_pl.modules.slider import noised_pair
from rlmusic_pl.rewards import SpectralCentroidReward

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
PROMPTS = ["a bright piano", "a calm guitar"]
TINY = dict(backbone="tiny", duration_s=0.5, val_num_steps=2, learning_rate=1e-3, lora_targets="attention+conv")


def write_pairs(folder: Path, pairs_per_prompt: int = 2) -> Path:
    """A pairs file of tones: the higher tone of each pair is chosen (a brightness judge)."""
    lines = []
    for p, prompt in enumerate(PROMPTS):
        for k in range(pairs_per_prompt):
            low, high = 200.0 * (1 + p + k), 1500.0 * (1 + p + k)
            for name, frequency in ((f"p{p}k{k}lo", low), (f"p{p}k{k}hi", high)):
                wave = 0.3 * torch.sin(2 * math.pi * frequency * torch.arange(RATE // 2) / RATE)
                write_wav(folder / "clips" / f"{name}.wav", wave, RATE)
            tie = "true" if (p, k) == (1, 1) else "false"
            lines.append(f'{{"prompt": "{prompt}", "chosen": "clips/p{p}k{k}hi.wav", "rejected": "clips/p{p}k{k}lo.wav", "tie": {tie}}}\n')
    path = folder / "pairs.jsonl"
    path.write_text("".join(lines))
    return path


def data(folder: Path, **kwargs) -> PromptAttributeDataModule:
    pairs = PreferencePairs(str(write_pairs(folder)), duration_s=0.5)
    return PromptAttributeDataModule(preferences=pairs, batch_size=2, negative_prompt="noise", **kwargs)


def module(**kwargs) -> DiffusionDPOModule:
    dpo = DiffusionDPOModule(SpectralCentroidReward(), **{**TINY, **kwargs})
    dpo.configure_model()
    return dpo


def perturb_lora(dpo: DiffusionDPOModule) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(dpo.backbone.unet):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def batch_of(folder: Path) -> dict:
    dm = data(folder)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def trainer(tmp_path, max_epochs: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", max_epochs=max_epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def test_the_loss_equals_a_hand_computation_on_a_fixed_batch(tmp_path):
    dpo = module(beta=5000.0)
    perturb_lora(dpo)
    batch = batch_of(tmp_path)
    batch["tie"] = torch.tensor([False, True])
    terms = dpo.dpo_terms(batch, torch.Generator().manual_seed(3))

    backbone = dpo.backbone
    with torch.no_grad():
        chosen = backbone.mel_to_latents(backbone.waveform_to_mel(batch["chosen_audio"]))
        rejected = backbone.mel_to_latents(backbone.waveform_to_mel(batch["rejected_audio"]))
        pair = noised_pair(backbone, chosen, rejected, torch.Generator().manual_seed(3))
        cond = backbone.encode_prompts(batch["prompt"])
        errors = {}
        for strength in (1.0, 0.0):
            with lora_strength(backbone.unet, strength):
                for side, noisy in (("w", pair.positive), ("l", pair.negative)):
                    eps = backbone.predict_noise(noisy, pair.timesteps, cond, 1.0)
                    errors[strength, side] = ((eps - pair.noise) ** 2).mean((1, 2, 3))
    z = -5000.0 * 0.5 * ((errors[1.0, "w"] - errors[0.0, "w"]) - (errors[1.0, "l"] - errors[0.0, "l"]))
    expected = torch.stack([-torch.log(torch.sigmoid(z[0])), -0.5 * torch.log(torch.sigmoid(z[1])) - 0.5 * torch.log(torch.sigmoid(-z[1]))]).mean()
    print("logits", z)
    assert z.abs().min() > 0.05  # the LoRA acts: the hand computation is not trivially log 2
    # beta w(t) = 2500 multiplies float32 rounding of the errors (one batched call against four calls here).
    torch.testing.assert_close(terms.logits, z, rtol=1e-3, atol=3e-3)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-3, atol=3e-3)
    assert terms.implicit_accuracy == ((z > 0).float().mean())


def test_with_a_fresh_lora_the_loss_is_log_2_and_the_gradient_is_not_zero(tmp_path):
    dpo = module()
    terms = dpo.dpo_terms(batch_of(tmp_path), torch.Generator().manual_seed(0))
    assert terms.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(terms.logits, torch.zeros(2)) and terms.implicit_accuracy == 0.5
    terms.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(dpo.backbone.unet))


def test_dpo_loss_of_ties_and_of_swapped_sides():
    policy, reference = torch.tensor([0.10, 0.30, 0.20, 0.25]), torch.tensor([0.15, 0.30, 0.15, 0.20])
    terms = dpo_loss(policy, reference, torch.tensor([False, False]), beta=10.0)
    torch.testing.assert_close(terms.logits, torch.tensor([-5.0 * (-0.05 - 0.05), -5.0 * (0.0 - 0.05)]))
    swapped = dpo_loss(policy[[2, 3, 0, 1]], reference[[2, 3, 0, 1]], torch.tensor([False, False]), beta=10.0)
    torch.testing.assert_close(swapped.logits, -terms.logits)
    tied = dpo_loss(policy, reference, torch.tensor([True, True]), beta=10.0)
    tied_swapped = dpo_loss(policy[[2, 3, 0, 1]], reference[[2, 3, 0, 1]], torch.tensor([True, True]), beta=10.0)
    torch.testing.assert_close(tied.loss, tied_swapped.loss)  # a tie has no side


def test_clip_latents_and_prompts_are_encoded_once(tmp_path):
    dpo = module()
    batch = batch_of(tmp_path)
    calls = []
    dpo.backbone.vae.register_forward_pre_hook(lambda *_: calls.append("vae"))
    first = dpo.dpo_terms(batch, torch.Generator().manual_seed(0))
    again = dpo.dpo_terms(batch, torch.Generator().manual_seed(0))
    assert len(dpo._latents) == 4 and len(dpo._texts) == len(set(batch["prompt"]))
    torch.testing.assert_close(again.loss, first.loss, rtol=0, atol=0)
    uncached = module(cache_encodings=False).dpo_terms(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(uncached.policy_errors, first.policy_errors, rtol=1e-5, atol=1e-7)


def test_training_batches_need_preference_pairs():
    dpo = module()
    with pytest.raises(KeyError, match="preferences=PreferencePairs"):
        dpo.training_step({"prompt": ["a"], "negative_prompt": [""], "attributes": [{}]}, 0)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def test_resumed_training_gives_the_same_next_losses(tmp_path):
    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", 3, callbacks=[uninterrupted], enable_checkpointing=False).fit(DiffusionDPOModule(SpectralCentroidReward(), **TINY), data(tmp_path))
    trainer(tmp_path / "b", 2).fit(DiffusionDPOModule(SpectralCentroidReward(), **TINY), data(tmp_path))
    checkpoint = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = LossRecorder()
    trainer(tmp_path / "b", 3, callbacks=[resumed], enable_checkpointing=False).fit(
        DiffusionDPOModule(SpectralCentroidReward(), **TINY), data(tmp_path), ckpt_path=checkpoint
    )
    assert len(uninterrupted.losses) == 6 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(uninterrupted.losses[4:], rel=1e-5, abs=1e-7)
    assert uninterrupted.losses[4] != pytest.approx(uninterrupted.losses[0], rel=1e-3)


def test_resume_needs_the_dpo_state(tmp_path):
    trainer(tmp_path, 1).fit(DiffusionDPOModule(SpectralCentroidReward(), **TINY), data(tmp_path))
    path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["dpo"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="no Diffusion-DPO state"):
        trainer(tmp_path, 2).fit(DiffusionDPOModule(SpectralCentroidReward(), **TINY), data(tmp_path), ckpt_path=path)


def test_mixed_precision_keeps_lora_weights_in_float32_and_trains(tmp_path):
    dpo = DiffusionDPOModule(SpectralCentroidReward(), **TINY)
    run = trainer(tmp_path, 2, precision="bf16-mixed", gradient_clip_val=1.0, accumulate_grad_batches=2)
    run.fit(dpo, data(tmp_path))
    assert all(p.dtype == torch.float32 for p in lora_parameters(dpo.backbone.unet))
    assert any(p.abs().sum() > 0 for n, p in dpo.backbone.unet.named_parameters() if ".lora_B." in n)
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_validation_scores_clips_of_the_held_out_prompts(tmp_path):
    dpo = DiffusionDPOModule(SpectralCentroidReward(), **TINY)
    run = Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    run.fit(dpo, data(tmp_path, val_fraction=0.25))
    metrics = run.callback_metrics
    assert {"val/reward/total", "val/loss", "val/implicit_accuracy", "val/margin", "train/loss"} <= metrics.keys()


def test_pairs_at_another_sample_rate_are_refused(tmp_path):
    pairs = PreferencePairs(str(write_pairs(tmp_path)), sample_rate=22050, duration_s=0.5)
    with pytest.raises(PreferenceDataError, match="sample_rate to 16000"):
        trainer(tmp_path, 1).fit(DiffusionDPOModule(SpectralCentroidReward(), **TINY), PromptAttributeDataModule(preferences=pairs))


def make_preferences(out: Path, env: dict) -> Path:
    """The tiny config's pairs (fewer prompts and steps): make-preferences on the tiny backbone."""
    command = [sys.executable, "-m", "rlmusic_pl", "make-preferences", str(out), "--backbone", "tiny", "--duration", "1",
               "--steps", "3", "--prompt", "a bright piano", "--prompt", "a calm guitar", "-k", "3", "--agreement", "0.85"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "pairs.jsonl"


def fit_tiny_config(tmp_path: Path, env: dict, *options: str) -> subprocess.CompletedProcess:
    pairs = make_preferences(tmp_path / "pairs", env)
    command = [sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(ROOT / "configs/tiny/dpo_audio_alpaca.yaml"),
               f"--data.preferences.init_args.path={pairs}", f"--trainer.default_root_dir={tmp_path / 'run'}",
               "--trainer.enable_progress_bar=false", "--model.val_num_steps=2", *options]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_tiny_config_fits_from_made_preferences_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = fit_tiny_config(tmp_path, env, f"--model.export_to={tmp_path / 'exported'}")
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next((tmp_path / "run").glob("lightning_logs/version_*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"train/loss", "train/implicit_accuracy", "train/margin", "val/loss", "val/reward/total"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "exported" / "pytorch_lora_weights.safetensors").is_file()


def test_ddp_on_two_cpu_processes_trains_the_same_lora_on_both_ranks(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RANK_STATE_DIR": str(tmp_path),
           "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = fit_tiny_config(tmp_path, env, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=2",
                             "--trainer.limit_val_batches=0", "--trainer.callbacks+=ddp_rank_state.RankState", "--data.batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["lora_sum"] == pytest.approx(states[1]["lora_sum"], rel=1e-6)  # averaged gradients, one update
    assert states[0]["lora_sum"] != pytest.approx(states[0]["lora_sum_at_start"], rel=1e-6)  # and they did train
