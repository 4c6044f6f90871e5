"""README.md stays true: its snippet that loads an exported adapter into a plain diffusers pipeline with peft runs."""

import re
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.tiny import build_tiny_pipeline
from rlmusic_pl.lora import LoRASettings, add_lora, lora_parameters, save_lora

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_with(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [block for block in blocks if text in block]
    return block


def test_the_peft_snippet_loads_an_exported_adapter_exactly_into_a_plain_pipeline(tmp_path, monkeypatch):
    trained = AudioLDM2Backbone.load("tiny")
    # alpha neither the rank nor peft's default (8): a snippet that dropped it would still pass otherwise
    add_lora(trained.unet, LoRASettings(rank=4, alpha=2.0, targets="self_attention+conv", init_seed=0))
    generator = torch.Generator().manual_seed(1)
    for param in lora_parameters(trained.unet):  # non-zero B weights: an untrained LoRA would hide a missing load
        param.data = 0.2 * torch.randn(param.shape, generator=generator)
    save_lora(trained.unet, tmp_path / "checkpoints" / "slider_stage1", {"kind": "SliderModule", "backbone": "tiny"})

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AudioLDM2Pipeline, "from_pretrained", lambda *args, **kwargs: build_tiny_pipeline(0))
    namespace = {}
    exec(python_block_with("inject_adapter_in_model"), namespace)  # noqa: S102 (our own README)

    plain = AudioLDM2Backbone(namespace["pipe"])
    cond = trained.encode_prompts(["a happy piano solo", "a sad cello"], ["low quality", ""])
    latents = trained.initial_latents(2, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.predict_noise(latents, torch.tensor(501), cond, guidance_scale=2.0)
        base = AudioLDM2Backbone.load("tiny").predict_noise(latents, torch.tensor(501), cond, guidance_scale=2.0)
        loaded = plain.predict_noise(latents, torch.tensor(501), cond, guidance_scale=2.0)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the output ...
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)  # ... and the plain pipeline reproduces it
