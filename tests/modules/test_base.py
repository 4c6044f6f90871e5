"""AudioLDM2Module checkpoints: only the trainable state is saved, a checkpoint without it (or of another module) is
refused, and a resumed run trains with the module's own optimizer settings."""

import pytest
import torch
from lightning import Trainer

from rlmusic_pl.data import SyntheticContrastSets
from rlmusic_pl.data.datamodule import PromptAttributeDataModule
from rlmusic_pl.modules import CheckpointError, DDPOModule, SliderModule
from rlmusic_pl.rewards import SpectralCentroidReward

MODULE_ARGS = dict(
    backbone="tiny", duration_s=1.0, num_steps=2, samples_per_prompt=2, sample_batch_size=2, train_batch_size=2,
    advantage="batch", lora_rank=2,
)


def tiny_module(**overrides) -> DDPOModule:
    return DDPOModule(reward=SpectralCentroidReward(), **{**MODULE_ARGS, **overrides})


def is_trainable_key(key: str) -> bool:
    return ".lora_" in key or ".rl_scale." in key


def fit_trainer(root, max_steps: int = 1) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, default_root_dir=root, logger=False,
                   enable_progress_bar=False, enable_model_summary=False)


def prompts() -> PromptAttributeDataModule:
    return PromptAttributeDataModule(prompts=["a happy piano solo"], batch_size=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step DDPO fit on the tiny backbone; returns the module and its checkpoint path."""
    root = tmp_path_factory.mktemp("run")
    module = tiny_module()
    fit_trainer(root).fit(module, datamodule=prompts())
    (checkpoint,) = root.rglob("*.ckpt")
    return module, checkpoint


def test_checkpoint_holds_only_the_trainable_state(trained):
    module, path = trained
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    full = module.state_dict()
    trainable = {k for k in full if is_trainable_key(k)}

    assert trainable and set(state) == trainable
    assert any(".lora_A." in k for k in state) and any(".rl_scale.gain" in k for k in state)
    assert not any(k.startswith("backbone.") and not is_trainable_key(k) for k in state)
    for key, value in state.items():
        assert torch.equal(value, full[key])
    saved_numbers = sum(v.numel() for v in state.values())
    assert saved_numbers < sum(p.numel() for p in module.backbone.unet.parameters()) / 5


def test_checkpoint_loads_its_lora_weights(trained, tmp_path):
    _, path = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    marked = {k: torch.full_like(v, 0.125) if ".lora_B." in k else v for k, v in checkpoint["state_dict"].items()}
    checkpoint["state_dict"] = marked
    torch.save(checkpoint, tmp_path / "marked.ckpt")

    loaded = DDPOModule.load_from_checkpoint(tmp_path / "marked.ckpt", reward=SpectralCentroidReward())
    state = loaded.state_dict()
    for key, value in marked.items():
        assert torch.equal(state[key], value), key
    assert loaded.hparams.lora_rank == MODULE_ARGS["lora_rank"]


@pytest.mark.parametrize("drop", ["all_lora", "one_tensor"])
def test_checkpoint_without_the_lora_is_refused(trained, tmp_path, drop):
    _, path = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    lora_keys = sorted(k for k in checkpoint["state_dict"] if ".lora_" in k)
    removed = lora_keys if drop == "all_lora" else lora_keys[:1]
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in removed}
    torch.save(checkpoint, tmp_path / "bad.ckpt")

    with pytest.raises(CheckpointError, match="lacks"):
        DDPOModule.load_from_checkpoint(tmp_path / "bad.ckpt", reward=SpectralCentroidReward())


def test_frozen_backbone_stays_in_eval_mode_when_training():
    module = tiny_module()
    module.configure_model()
    module.train()
    assert module.training
    assert not module.backbone.training and not any(m.training for m in module.backbone.modules())
    assert {id(p) for p in module.parameters() if p.requires_grad} == {
        id(p) for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }


@pytest.fixture(scope="module")
def slider_checkpoint(tmp_path_factory):
    """The checkpoint of a one-step SliderModule fit."""
    root = tmp_path_factory.mktemp("slider")
    contrast = SyntheticContrastSets(str(root / "synthetic"), count=2, duration_s=1.0, segment_s=1.0)
    data = PromptAttributeDataModule(prompts=["a piano"], batch_size=2, contrast=contrast)
    fit_trainer(root).fit(SliderModule(backbone="tiny", duration_s=1.0), data)
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint


def test_resuming_from_a_checkpoint_of_another_module_names_both_classes_before_writing(slider_checkpoint, tmp_path):
    module = tiny_module(export_to=str(tmp_path / "export"))
    expected = r"slider.*ckpt was saved by SliderModule .*, but the model to resume is DDPOModule"
    with pytest.raises(CheckpointError, match=expected):
        fit_trainer(tmp_path, max_steps=2).fit(module, prompts(), ckpt_path=slider_checkpoint)
    assert not (tmp_path / "export").exists() and not (tmp_path / "adapter").exists()


def test_resuming_with_another_lora_rank_names_the_tensors_that_do_not_fit(trained, tmp_path):
    _, path = trained
    with pytest.raises(CheckpointError, match=r"differ in shape .*\(2, \d+\) \(this model: \(4, \d+\)\).*lora_rank"):
        fit_trainer(tmp_path, max_steps=2).fit(tiny_module(lora_rank=4), prompts(), ckpt_path=path)


def test_a_resumed_run_trains_with_its_own_learning_rate_and_the_saved_moments(trained, tmp_path):
    _, path = trained
    trainer = fit_trainer(tmp_path, max_steps=2)
    trainer.fit(tiny_module(learning_rate=0.5, weight_decay=0.25), prompts(), ckpt_path=path)
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.25
    assert trainer.optimizers[0].state[group["params"][0]]["step"] == 2  # the saved moments went on
