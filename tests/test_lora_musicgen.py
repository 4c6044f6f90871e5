"""peft LoRA on the MusicGen decoder: presets, signed strength, peft's own file layout (loadable without rlmusic_pl)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SCALE_WEIGHTS,
    LoRAError,
    LoRASettings,
    add_lora,
    load_lora,
    lora_layers,
    lora_parameters,
    lora_strength,
    read_adapter_info,
    save_lora,
    scale_layers,
    scale_parameters,
)

PROMPTS = ["a bright C note", "a dull G note"]
POLICY = dict(guidance_scale=3.0, temperature=1.0, top_k=None)


def tiny_backbone(**kwargs) -> MusicGenBackbone:
    return MusicGenBackbone.load("tiny", seed=0, text_length=16, **kwargs)


def randomise_lora(decoder, seed: int = 0) -> None:
    """Non-zero LoRA weights (peft initialises B to zero, which would hide every bug)."""
    generator = torch.Generator().manual_seed(seed)
    for param in lora_parameters(decoder):
        param.data = torch.randn(param.shape, generator=generator) * 0.3


@pytest.fixture(scope="module")
def codes_and_cond():
    backbone = tiny_backbone()
    cond = backbone.encode_prompts(PROMPTS)
    return backbone.sample(cond, 8, generator=torch.Generator().manual_seed(0), **POLICY).codes, cond


def scores(backbone: MusicGenBackbone, codes_and_cond) -> torch.Tensor:
    codes, cond = codes_and_cond
    with torch.no_grad():
        return backbone.log_probs(codes, cond, **POLICY).log_probs


def adapted_names(targets: str) -> list[str]:
    backbone = tiny_backbone()
    add_lora(backbone.decoder, LoRASettings(targets=targets))
    return sorted(lora_layers(backbone.decoder))


# ------------------------------------------------------------------------------ targets
def test_presets_select_the_decoder_projections():
    attention = adapted_names("attention")
    assert len(attention) == 2 * 2 * 4  # 2 layers x (self, cross) x (q, k, v, out)
    assert "model.decoder.layers.1.encoder_attn.out_proj" in attention and "model.decoder.layers.0.self_attn.q_proj" in attention
    self_attention = adapted_names("self_attention")
    assert self_attention == [n for n in attention if ".self_attn." in n]
    with_ffn = adapted_names("attention+ffn")
    assert sorted(set(with_ffn) - set(attention)) == [f"model.decoder.layers.{i}.fc{j}" for i in (0, 1) for j in (1, 2)]
    assert set(adapted_names("self_attention+ffn")) == set(self_attention) | (set(with_ffn) - set(attention))
    assert adapted_names(r"model\.decoder\.layers\.0\.fc1") == ["model.decoder.layers.0.fc1"]


def test_unet_presets_and_regexes_matching_nothing_in_the_decoder_are_a_clear_error():
    for targets in ("attention+conv", r".*attn1\.to_q"):
        with pytest.raises(LoRAError, match="match no Linear/Conv2d module of the MusicgenForCausalLM"):
            add_lora(tiny_backbone().decoder, LoRASettings(targets=targets))


def test_trainable_weights_are_float32_on_a_bfloat16_decoder(codes_and_cond):
    backbone = tiny_backbone(dtype=torch.bfloat16)
    add_lora(backbone.decoder, LoRASettings(rank=2))
    randomise_lora(backbone.decoder)
    params = lora_parameters(backbone.decoder)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    codes, cond = codes_and_cond
    backbone.log_probs(codes, cond.to(torch.bfloat16), **POLICY).log_probs.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# ------------------------------------------------------------------------------ strength
def test_strength_zero_is_exactly_the_base_model(codes_and_cond):
    base = scores(tiny_backbone(), codes_and_cond)
    backbone = tiny_backbone()
    add_lora(backbone.decoder, LoRASettings(targets="attention+ffn"))
    randomise_lora(backbone.decoder)
    with lora_strength(backbone.decoder, 0.0):
        assert torch.equal(scores(backbone, codes_and_cond), base)
        codes, cond = codes_and_cond
        assert torch.equal(backbone.sample(cond, 8, generator=torch.Generator().manual_seed(0), **POLICY).codes, codes)
    assert not torch.allclose(scores(backbone, codes_and_cond), base, atol=1e-3)


def test_per_sample_strengths_apply_to_both_guidance_halves(codes_and_cond):
    backbone = tiny_backbone()
    add_lora(backbone.decoder, LoRASettings())
    randomise_lora(backbone.decoder)
    with lora_strength(backbone.decoder, torch.tensor([0.0, -1.0])):
        mixed = scores(backbone, codes_and_cond)
    with lora_strength(backbone.decoder, 0.0):
        at_zero = scores(backbone, codes_and_cond)
    with lora_strength(backbone.decoder, -1.0):
        at_minus_one = scores(backbone, codes_and_cond)
    torch.testing.assert_close(mixed[0], at_zero[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], at_minus_one[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ files
@pytest.fixture
def saved_adapter(tmp_path):
    """A rank-4, alpha-8 attention+ffn LoRA with random weights and gains, saved in peft's layout."""
    backbone = tiny_backbone()
    settings = LoRASettings(rank=4, alpha=8.0, targets="attention+ffn")
    add_lora(backbone.decoder, settings)
    randomise_lora(backbone.decoder, seed=1)
    generator = torch.Generator().manual_seed(2)
    for gain in scale_parameters(backbone.decoder):
        gain.data = torch.rand(gain.shape, generator=generator) + 0.5
    directory = save_lora(backbone.decoder, tmp_path / "adapter", {"kind": "TestModule"}, layout="peft")
    return backbone, settings, directory


def test_peft_layout_files(saved_adapter):
    backbone, _, directory = saved_adapter
    assert sorted(p.name for p in directory.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, SCALE_WEIGHTS])
    state = load_file(str(directory / PEFT_WEIGHTS))
    assert len(state) == 2 * len(lora_layers(backbone.decoder))
    assert all(k.startswith("base_model.model.model.decoder.layers.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    config = json.loads((directory / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == sorted(lora_layers(backbone.decoder))
    assert read_adapter_info(directory)["kind"] == "TestModule"


def test_our_loader_reloads_a_peft_adapter_exactly(saved_adapter, codes_and_cond):
    backbone, settings, directory = saved_adapter
    fresh = tiny_backbone()
    assert load_lora(fresh.decoder, directory) == settings
    for name, layer in scale_layers(backbone.decoder).items():
        assert torch.equal(scale_layers(fresh.decoder)[name].gain, layer.gain)
    for strength in (1.0, -1.0, 0.5):
        with lora_strength(backbone.decoder, strength), lora_strength(fresh.decoder, strength):
            assert torch.equal(scores(fresh, codes_and_cond), scores(backbone, codes_and_cond))


def test_peft_adapter_without_our_scale_file_loads_with_its_config(saved_adapter, codes_and_cond):
    backbone, settings, directory = saved_adapter
    (directory / SCALE_WEIGHTS).unlink()
    for gain in scale_parameters(backbone.decoder):
        gain.data.fill_(1.0)
    fresh = tiny_backbone()
    loaded = load_lora(fresh.decoder, directory)
    assert (loaded.rank, loaded.alpha) == (4, 8.0)
    assert torch.equal(scores(fresh, codes_and_cond), scores(backbone, codes_and_cond))
    (directory / PEFT_CONFIG).unlink()
    with pytest.raises(LoRAError, match=PEFT_CONFIG):
        load_lora(tiny_backbone().decoder, directory)


def test_peft_adapter_mismatches_are_clear_errors(saved_adapter):
    _, _, directory = saved_adapter
    with pytest.raises(LoRAError, match="rank 4 and targets 'attention\\+ffn'"):
        load_lora(tiny_backbone().decoder, directory, LoRASettings(rank=4, alpha=8.0, targets="attention"))
    with pytest.raises(LoRAError, match="layout"):
        save_lora(saved_adapter[0].decoder, directory.parent / "other", layout="pytorch")


CHILD = textwrap.dedent(
    """
    import sys

    import torch
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    model_dir, adapter_dir, inputs_path, output_path = sys.argv[1:]
    model = MusicgenForConditionalGeneration.from_pretrained(model_dir)
    decoder = PeftModel.from_pretrained(model.decoder, adapter_dir).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        torch.save(decoder(**inputs).logits, output_path)
    assert not [name for name in sys.modules if name.startswith("rlmusic_pl")], "rlmusic_pl was imported"
    """
)


@pytest.mark.slow
def test_plain_peft_loads_the_adapter_without_rlmusic_pl(tmp_path, codes_and_cond):
    backbone = tiny_backbone()
    backbone.model.save_pretrained(tmp_path / "model")
    add_lora(backbone.decoder, LoRASettings(rank=4, alpha=8.0, targets="attention+ffn"))
    randomise_lora(backbone.decoder, seed=3)
    save_lora(backbone.decoder, tmp_path / "adapter", layout="peft")
    codes, cond = codes_and_cond
    inputs = dict(input_ids=codes.reshape(-1, codes.shape[-1]), encoder_hidden_states=cond.hidden_states, encoder_attention_mask=cond.attention_mask)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "child.py").write_text(CHILD)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "child.py", "model", "adapter", "inputs.pt", "logits.pt"]
    result = subprocess.run(command, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    with torch.no_grad():
        ours = backbone.decoder(**inputs).logits
        without_lora = tiny_backbone().decoder(**inputs).logits
    theirs = torch.load(tmp_path / "logits.pt")
    assert not torch.allclose(ours, without_lora, atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
