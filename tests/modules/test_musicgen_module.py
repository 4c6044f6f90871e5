"""MusicGenModule: frozen MusicGen in eval mode, lean checkpoints, refusal of checkpoints without the LoRA, peft export."""

import pytest
import torch
from lightning import Trainer

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.data.datamodule import PromptAttributeDataModule
from rlmusic_pl.lora import PEFT_CONFIG, PEFT_WEIGHTS, load_lora, lora_parameters, read_adapter_info
from rlmusic_pl.modules import CheckpointError, MusicGenModule

BACKBONE_ARGS = dict(backbone="tiny", text_length=16, lora_rank=2, lora_alpha=4.0)


class LikelihoodModule(MusicGenModule):
    """Raises the likelihood of its own samples: the smallest training step that uses sampling, scoring and the LoRA.

    Args:
        num_frames: code frames per sample.
    """

    def __init__(self, num_frames: int = 4, **backbone_args) -> None:
        super().__init__(**backbone_args)

    def configure_optimizers(self):
        return torch.optim.AdamW(lora_parameters(self.backbone.decoder), lr=1e-2)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        cond = self.backbone.encode_prompts(batch["prompt"])
        codes = self.backbone.sample(cond, self.hparams.num_frames, generator=torch.Generator().manual_seed(batch_idx)).codes
        return -self.backbone.log_probs(codes, cond).log_probs.mean()


def is_trainable_key(key: str) -> bool:
    return ".lora_" in key or ".rl_scale." in key


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step fit on the tiny MusicGen; returns the module, its checkpoint and the run directory."""
    root = tmp_path_factory.mktemp("run")
    module = LikelihoodModule(export_to=str(root / "exported"), **BACKBONE_ARGS)
    data = PromptAttributeDataModule(prompts=["a bright C note", "a dull G note"], batch_size=2)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    (checkpoint,) = root.rglob("*.ckpt")
    return module, checkpoint, root


def test_checkpoint_holds_only_the_trainable_state(trained):
    module, path, _ = trained
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    full = module.state_dict()
    trainable = {k for k in full if is_trainable_key(k)}
    assert trainable and set(state) == trainable
    assert all(k.startswith("backbone.model.decoder.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, full[key])
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items()), "training did not move the LoRA"


def test_adapter_is_exported_in_peft_layout_and_copied(trained):
    module, _, root = trained
    for directory in (root / "adapter", root / "exported"):
        assert (directory / PEFT_WEIGHTS).is_file() and (directory / PEFT_CONFIG).is_file()
        assert read_adapter_info(directory)["kind"] == "LikelihoodModule"
    fresh = MusicGenBackbone.load("tiny", text_length=16)
    load_lora(fresh.decoder, root / "adapter")
    cond = fresh.encode_prompts(["a bright C note"])
    codes = fresh.sample(cond, 4, generator=torch.Generator().manual_seed(0)).codes
    with torch.no_grad():
        assert torch.equal(fresh.log_probs(codes, cond).log_probs, module.backbone.log_probs(codes, cond).log_probs)


def test_checkpoint_loads_its_lora_weights(trained, tmp_path):
    _, path, _ = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    marked = {k: torch.full_like(v, 0.125) if ".lora_B." in k else v for k, v in checkpoint["state_dict"].items()}
    checkpoint["state_dict"] = marked
    torch.save(checkpoint, tmp_path / "marked.ckpt")

    loaded = LikelihoodModule.load_from_checkpoint(tmp_path / "marked.ckpt")
    state = loaded.state_dict()
    for key, value in marked.items():
        assert torch.equal(state[key], value), key
    assert loaded.hparams.lora_rank == 2 and loaded.hparams.num_frames == 4


def test_checkpoint_without_the_lora_is_refused(trained, tmp_path):
    _, path, _ = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_A." not in k}
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="lacks"):
        LikelihoodModule.load_from_checkpoint(tmp_path / "bad.ckpt")


def test_frozen_backbone_stays_in_eval_mode_and_only_the_lora_trains():
    module = LikelihoodModule(lora_targets="attention+ffn", **{**BACKBONE_ARGS, "lora_rank": 2})
    module.configure_model()
    module.train()
    assert module.training
    assert not any(m.training for m in module.backbone.modules())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".fc1.lora_A." in n for n in trainable)


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients():
    def lora_gradients(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        module = LikelihoodModule(gradient_checkpointing=checkpointing, **BACKBONE_ARGS)
        module.configure_model()
        for param in lora_parameters(module.backbone.decoder):
            param.data.normal_(generator=torch.Generator().manual_seed(0))
        module.train()
        cond = module.backbone.encode_prompts(["a bright C note"])
        codes = module.backbone.sample(cond, 4, generator=torch.Generator().manual_seed(0)).codes
        calls = []
        module.backbone.decoder.model.decoder.layers[0].fc1.register_forward_hook(lambda *args: calls.append(1))
        module.backbone.log_probs(codes, cond).log_probs.sum().backward()
        return [p.grad for p in lora_parameters(module.backbone.decoder)], len(calls)

    plain, plain_calls = lora_gradients(False)
    checkpointed, checkpointed_calls = lora_gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2), "the checkpointed layer must run again in the backward pass"
    for expected, actual in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_unknown_frozen_dtype_is_refused():
    with pytest.raises(ValueError, match="frozen_dtype"):
        LikelihoodModule(frozen_dtype="float8", **BACKBONE_ARGS)
