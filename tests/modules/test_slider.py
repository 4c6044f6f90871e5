"""SliderModule (Stage 1): paired objective, gradients, per-sample strengths, and a measured slider effect."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from rlmusic_pl.data import PromptAttributeDataModule, SyntheticContrastSets
from rlmusic_pl.lora import load_lora, lora_layers, lora_parameters, lora_strength, read_adapter_info
from rlmusic_pl.modules import SliderModule, generate_at_strengths
from rlmusic_pl.modules.slider import noised_pair

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["A piano melody", "jazz", "A piano melody", "drums and bass"]
STRENGTHS = [-1.0, -0.5, 0.0, 0.5, 1.0]


def tiny_slider(**kwargs) -> SliderModule:
    module = SliderModule(backbone="tiny", duration_s=1.0, val_num_steps=10, **kwargs)
    module.configure_model()
    return module


def perturb_lora(module: SliderModule) -> None:
    """Non-zero LoRA B weights (peft initialises them to 0), so the strength changes the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(module.backbone.unet):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def batch_of_latents(module, batch=3):
    generator = torch.Generator().manual_seed(1)
    shape = (batch, *module.backbone.latent_shape(1.0))
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_both_sides_are_noised_with_the_same_noise_and_timestep():
    module = tiny_slider()
    positive, negative = batch_of_latents(module, batch=6)
    pair = noised_pair(module.backbone, positive, negative, torch.Generator().manual_seed(0))
    alphas = module.backbone.scheduler.alphas_cumprod[pair.timesteps].view(-1, 1, 1, 1)
    for clean, noisy in ((positive, pair.positive), (negative, pair.negative)):
        recovered = (noisy - alphas.sqrt() * clean) / (1 - alphas).sqrt()
        torch.testing.assert_close(recovered, pair.noise, atol=1e-4, rtol=1e-4)
    assert pair.timesteps.shape == (6,) and len(set(pair.timesteps.tolist())) > 1  # one timestep per pair


def test_positive_side_runs_at_plus_s_and_negative_side_at_minus_s():
    module = tiny_slider()
    perturb_lora(module)
    unet = module.backbone.unet
    positive, negative = batch_of_latents(module)
    pair = noised_pair(module.backbone, positive, negative, torch.Generator().manual_seed(0))
    cond = module.backbone.encode_prompts(["a"] * 3)
    seen = []
    layer = next(iter(lora_layers(unet).values()))
    handle = layer.lora_B["default"].register_forward_hook(lambda *args: seen.append(layer.rl_scale.strength))
    loss_positive, loss_negative = module.slider_losses(pair, cond, 0.5)
    handle.remove()
    assert torch.equal(seen[0], torch.tensor([0.5] * 3 + [-0.5] * 3))
    for sign, noisy, loss in ((1, pair.positive, loss_positive), (-1, pair.negative, loss_negative)):
        with torch.no_grad(), lora_strength(unet, sign * 0.5):
            eps = module.backbone.predict_noise(noisy, pair.timesteps, cond, 1.0)
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(eps, pair.noise), rtol=1e-4, atol=1e-6)


def test_snr_gamma_weighs_low_noise_timesteps_down_and_leaves_noisy_ones_whole():
    module = tiny_slider(snr_gamma=5.0)
    scheduler = module.backbone.scheduler
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    weights = module.timestep_weights(timesteps)
    torch.testing.assert_close(weights, torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr)))
    assert weights[0] < 0.1 and weights[-1] == 1.0
    assert torch.equal(tiny_slider().timestep_weights(timesteps), torch.ones(4))


def test_snr_gamma_weights_each_pairs_loss():
    module = tiny_slider(snr_gamma=1.0)
    perturb_lora(module)
    positive, negative = batch_of_latents(module)
    pair = noised_pair(module.backbone, positive, negative, torch.Generator().manual_seed(0))
    pair = dataclasses.replace(pair, timesteps=torch.tensor([0, 50, 999]))  # one low-noise, one noisy step at least
    cond = module.backbone.encode_prompts(["a"] * 3)
    loss_positive, _ = module.slider_losses(pair, cond, 1.0)
    with torch.no_grad(), lora_strength(module.backbone.unet, 1.0):
        eps = module.backbone.predict_noise(pair.positive, pair.timesteps, cond, 1.0)
    per_pair = (eps - pair.noise).pow(2).flatten(1).mean(1)
    expected = (per_pair * module.timestep_weights(pair.timesteps)).mean()
    torch.testing.assert_close(loss_positive, expected, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(loss_positive, per_pair.mean())


def test_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="snr_gamma"):
        SliderModule(backbone="tiny", snr_gamma=0.0)


def test_only_lora_weights_receive_gradients():
    module = tiny_slider(lora_targets="self_attention+conv")
    perturb_lora(module)
    positive, negative = batch_of_latents(module)
    pair = noised_pair(module.backbone, positive, negative, torch.Generator().manual_seed(0))
    sum(module.slider_losses(pair, module.backbone.encode_prompts(["a"] * 3), 1.0)).backward()
    lora_ids = {id(p) for p in lora_parameters(module.backbone.unet)}
    assert any(".resnets." in name and ".lora_A." in name for name, _ in module.named_parameters())
    for name, param in module.named_parameters():
        if id(param) in lora_ids:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name  # base weights and scale-layer gains


def test_per_sample_strengths_match_one_call_per_strength():
    module = tiny_slider()
    perturb_lora(module)
    latents, _ = batch_of_latents(module, batch=2)
    cond = module.backbone.encode_prompts(["a", "b"])
    t = torch.tensor(500)
    with torch.no_grad():
        for guidance in (1.0, 3.0):  # 3.0: the guided batch repeats the samples ([negative, positive])
            with lora_strength(module.backbone.unet, torch.tensor([1.0, -0.5])):
                both = module.backbone.predict_noise(latents, t, cond, guidance)
            for index, strength in enumerate((1.0, -0.5)):
                with lora_strength(module.backbone.unet, strength):
                    one = module.backbone.predict_noise(latents[index : index + 1], t, cond[index : index + 1], guidance)
                torch.testing.assert_close(both[index : index + 1], one, atol=1e-5, rtol=1e-4)


def test_strengths_must_be_positive():
    with pytest.raises(ValueError, match="strengths must be a non-empty list of positive numbers"):
        SliderModule(backbone="tiny", strengths=[0.5, -1.0])


def attribute_by_strength(module: SliderModule) -> torch.Tensor:
    """Attribute scores [prompts, strengths] of deterministic generations from one fixed noise per prompt."""
    backbone = module.backbone
    cond = backbone.encode_prompts(PROMPTS)
    noise = backbone.initial_latents(len(PROMPTS), 1.0, torch.Generator().manual_seed(1))
    latents = generate_at_strengths(backbone, cond, noise, STRENGTHS, num_steps=10, guidance_scale=3.5)
    return latents, module.attribute_probe.score(latents).view(len(STRENGTHS), len(PROMPTS)).T


def test_trained_slider_moves_the_attribute_monotonically_and_an_untrained_one_does_not(tmp_path):
    # The tiny config's training (60 steps), in process.
    L.seed_everything(0)
    module = SliderModule(backbone="tiny", strengths=[0.5, 1.0], learning_rate=3e-4, duration_s=1.0, val_num_steps=10)
    data = PromptAttributeDataModule(prompts=["A piano melody", "A melody played on an organ"], batch_size=4,
                                     contrast=SyntheticContrastSets(str(tmp_path / "syn"), count=8, duration_s=2.0, segment_s=1.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    latents, scores = attribute_by_strength(module)
    print("trained slider, attribute by strength", STRENGTHS, "\n", scores)
    assert (scores.diff(dim=1) > 0).all(), scores  # strictly increasing in the strength, for every prompt
    assert (scores[:, -1] - scores[:, 0] > 1.0).all(), scores  # more than the distance between the two sets' means

    untrained = tiny_slider()
    untrained.attribute_probe.load_state_dict(module.attribute_probe.state_dict())
    untrained_latents, untrained_scores = attribute_by_strength(untrained)
    assert (untrained_scores.max(1).values - untrained_scores.min(1).values < 1e-4).all(), untrained_scores
    assert torch.equal(untrained_latents[: len(PROMPTS)], untrained_latents[-len(PROMPTS) :])


def test_training_batches_need_contrast_pairs():
    module = tiny_slider()
    with pytest.raises(KeyError, match="contrast=ContrastSets"):
        module.training_step({"prompt": ["a"], "negative_prompt": [""], "attributes": [{}]}, 0)


@pytest.mark.slow
def test_tiny_config_fits_validates_and_exports_the_slider(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(ROOT / "configs/tiny/slider_stage1.yaml"),
        "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.export_to={tmp_path / 'exported'}",
        f"--data.contrast.directory={tmp_path / 'syn'}",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    for adapter in (run_dir / "adapter", tmp_path / "exported"):
        assert {p.name for p in adapter.iterdir()} == {"pytorch_lora_weights.safetensors", "scale_layers.safetensors"}
    info = read_adapter_info(tmp_path / "exported")
    assert info["kind"] == "SliderModule" and info["contrast"]["attribute"] == "brightness"
    assert len(info["attribute_probe"]["positive_mean"]) == 8  # latent channels
    fresh = tiny_slider()
    load_lora(fresh.backbone.unet, tmp_path / "exported")
    assert any(p.abs().sum() > 0 for n, p in fresh.backbone.unet.named_parameters() if ".lora_B." in n)
    checkpoint = next((run_dir / "checkpoints").glob("*.ckpt"))
    validate = [sys.executable, "-m", "rlmusic_pl", "validate", "--config", str(ROOT / "configs/tiny/slider_stage1.yaml"),
                f"--trainer.default_root_dir={tmp_path / 'val'}", f"--data.contrast.directory={tmp_path / 'syn'}",
                f"--ckpt_path={checkpoint}", "--trainer.enable_progress_bar=false"]
    result = subprocess.run(validate, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/attribute_slope" in result.stdout
