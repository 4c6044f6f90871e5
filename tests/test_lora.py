"""peft LoRA on the UNet: signed strength, scale layers, diffusers-format files, clear load errors."""

import re

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import load_file, save_file

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.lora import (
    LORA_WEIGHTS,
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
    set_strength,
)


def tiny_backbone(**kwargs) -> AudioLDM2Backbone:
    return AudioLDM2Backbone.load("tiny", seed=0, **kwargs)


def randomise_lora(unet, seed: int = 0) -> None:
    """Non-zero LoRA weights (peft initialises B to zero, which would hide every bug)."""
    generator = torch.Generator().manual_seed(seed)
    for param in lora_parameters(unet):
        param.data = torch.randn(param.shape, generator=generator) * 0.2


@pytest.fixture(scope="module")
def inputs():
    backbone = tiny_backbone()
    cond = backbone.encode_prompts(["a happy piano solo", "a sad cello"], ["low quality", ""])
    latents = backbone.initial_latents(2, 1.0, torch.Generator().manual_seed(0))
    return cond, latents, torch.tensor(501)


def noise(backbone, inputs) -> torch.Tensor:
    cond, latents, t = inputs
    with torch.no_grad():
        return backbone.predict_noise(latents, t, cond, guidance_scale=2.0)


def first_layer(unet, kind: type):
    return next(layer for layer in lora_layers(unet).values() if isinstance(layer.base_layer, kind))


def lora_update(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output minus its frozen base layer's output."""
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


def hooked_lora_branch(layer, x: torch.Tensor) -> torch.Tensor:
    """lora_B(lora_A(x)) through the scale layer's hook (what strength and gain multiply)."""
    with torch.no_grad():
        return layer.lora_B["default"](layer.lora_A["default"](x))


def layer_input(layer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = layer.base_layer
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn((2, base.in_channels, 6, 5), generator=generator)
    return torch.randn((2, 7, base.in_features), generator=generator)


# ------------------------------------------------------------------------------ strength and gain
def test_strength_zero_is_exactly_the_base_unet(inputs):
    backbone = tiny_backbone()
    base = noise(backbone, inputs)
    add_lora(backbone.unet, LoRASettings(rank=4, targets="attention+conv"))
    randomise_lora(backbone.unet)

    with_lora = noise(backbone, inputs)
    assert not torch.allclose(with_lora, base, atol=1e-3), "non-zero LoRA weights must change the output"
    with lora_strength(backbone.unet, 0.0):
        assert torch.equal(noise(backbone, inputs), base)
    assert torch.equal(noise(backbone, inputs), with_lora), "lora_strength must restore the previous strength"
    set_strength(backbone.unet, 0.0)
    assert torch.equal(noise(backbone, inputs), base)


@pytest.mark.parametrize("kind", [torch.nn.Linear, torch.nn.Conv2d])
def test_negative_strength_negates_the_lora_update(kind):
    backbone = tiny_backbone()
    add_lora(backbone.unet, LoRASettings(rank=4, targets="attention+conv"))
    randomise_lora(backbone.unet)
    layer = first_layer(backbone.unet, kind)
    x = layer_input(layer)

    set_strength(backbone.unet, 0.7)
    branch_plus, update_plus = hooked_lora_branch(layer, x), lora_update(layer, x)
    set_strength(backbone.unet, -0.7)
    branch_minus, update_minus = hooked_lora_branch(layer, x), lora_update(layer, x)

    assert branch_plus.abs().max() > 0
    assert torch.equal(branch_minus, -branch_plus)
    torch.testing.assert_close(update_minus, -update_plus, rtol=1e-5, atol=1e-6)
    set_strength(backbone.unet, 1.0)
    torch.testing.assert_close(lora_update(layer, x), update_plus / 0.7, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", [torch.nn.Linear, torch.nn.Conv2d])
def test_scale_layer_gain_multiplies_the_update_per_output_channel(kind):
    backbone = tiny_backbone()
    add_lora(backbone.unet, LoRASettings(rank=4, targets="attention+conv"))
    randomise_lora(backbone.unet)
    name, layer = next((n, m) for n, m in lora_layers(backbone.unet).items() if isinstance(m.base_layer, kind))
    x = layer_input(layer)
    unit = lora_update(layer, x)

    gain = scale_layers(backbone.unet)[name].gain
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    channels = gain.numel()
    gain.data = torch.linspace(-2.0, 3.0, channels)
    scaled = lora_update(layer, x)

    per_channel = gain.view(-1, 1, 1) if kind is torch.nn.Conv2d else gain
    torch.testing.assert_close(scaled, unit * per_channel, rtol=1e-4, atol=1e-5)
    with lora_strength(backbone.unet, -0.5):
        torch.testing.assert_close(lora_update(layer, x), -0.5 * unit * per_channel, rtol=1e-4, atol=1e-5)


def test_lora_weights_are_trainable_float32_on_a_float16_unet():
    backbone = tiny_backbone(dtype=torch.float16)
    assert backbone.unet.dtype == torch.float16
    add_lora(backbone.unet, LoRASettings(rank=2, targets="attention+conv"))

    params = lora_parameters(backbone.unet)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(not p.requires_grad for p in scale_parameters(backbone.unet))
    lora_ids = {id(p) for p in params}
    frozen = [p for p in backbone.unet.parameters() if id(p) not in lora_ids and p.dtype == torch.float16]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert {id(p) for p in backbone.unet.parameters() if p.requires_grad} == lora_ids

    layer = first_layer(backbone.unet, torch.nn.Linear)
    out = layer(layer_input(layer).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_A["default"].weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------ targets
def adapted_names(targets: str) -> list[str]:
    backbone = tiny_backbone()
    add_lora(backbone.unet, LoRASettings(rank=2, targets=targets))
    return list(lora_layers(backbone.unet))


def test_self_attention_preset_leaves_cross_attention_alone():
    names = adapted_names("self_attention")
    assert names and all(".attn1." in n for n in names)
    assert not any(".attn2." in n or "resnets" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0"}


def test_attention_preset_adapts_both_attentions_but_no_conv():
    names = adapted_names("attention")
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    assert not any("resnets" in n for n in names)


def test_attention_conv_preset_adapts_resnet_convolutions():
    names = adapted_names("attention+conv")
    convs = [n for n in names if re.search(r"resnets\.\d+\.conv[12]$", n)]
    assert convs and any(".attn2." in n for n in names)
    assert not any(n.endswith("conv_shortcut") for n in names)


def test_a_custom_regex_selects_exactly_its_modules():
    names = adapted_names(r"mid_block\.attentions\.0\..*attn1\.to_q")
    assert names == ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]


def test_targets_matching_nothing_are_a_clear_error():
    backbone = tiny_backbone()
    with pytest.raises(LoRAError, match="no_such_module"):
        add_lora(backbone.unet, LoRASettings(targets=r".*no_such_module"))
    assert not lora_layers(backbone.unet)


def test_a_second_adapter_is_refused():
    backbone = tiny_backbone()
    add_lora(backbone.unet, LoRASettings())
    with pytest.raises(LoRAError, match="already"):
        add_lora(backbone.unet, LoRASettings())


# ------------------------------------------------------------------------------ files
@pytest.fixture
def saved_adapter(tmp_path):
    """A LoRA (rank 4, alpha 8, attention+conv) with random weights and gains, saved; and its outputs."""
    backbone = tiny_backbone()
    settings = LoRASettings(rank=4, alpha=8.0, targets="attention+conv")
    add_lora(backbone.unet, settings)
    randomise_lora(backbone.unet, seed=1)
    generator = torch.Generator().manual_seed(2)
    for gain in scale_parameters(backbone.unet):
        gain.data = torch.rand(gain.shape, generator=generator) + 0.5
    directory = save_lora(backbone.unet, tmp_path / "adapter", {"kind": "TestModule", "step": 3})
    return backbone, settings, directory


def test_save_then_load_into_a_fresh_backbone_gives_identical_outputs(saved_adapter, inputs):
    backbone, settings, directory = saved_adapter
    fresh = tiny_backbone()
    loaded = load_lora(fresh.unet, directory)

    assert loaded == settings
    torch.testing.assert_close(noise(fresh, inputs), noise(backbone, inputs), rtol=0, atol=0)
    for name, layer in scale_layers(backbone.unet).items():
        assert torch.equal(scale_layers(fresh.unet)[name].gain, layer.gain)
    for strength in (-1.0, 0.5):
        with lora_strength(backbone.unet, strength), lora_strength(fresh.unet, strength):
            torch.testing.assert_close(noise(fresh, inputs), noise(backbone, inputs), rtol=0, atol=0)
    info = read_adapter_info(directory)
    assert info["kind"] == "TestModule" and info["step"] == 3
    assert info["settings"]["rank"] == 4 and info["settings"]["targets"] == "attention+conv"


def test_load_into_a_unet_that_already_has_the_same_lora(saved_adapter, inputs):
    backbone, settings, directory = saved_adapter
    fresh = tiny_backbone()
    add_lora(fresh.unet, settings)
    load_lora(fresh.unet, directory)
    torch.testing.assert_close(noise(fresh, inputs), noise(backbone, inputs), rtol=0, atol=0)


def test_saved_file_is_in_diffusers_lora_format(saved_adapter):
    backbone, _, directory = saved_adapter
    assert (directory / LORA_WEIGHTS).is_file() and (directory / SCALE_WEIGHTS).is_file()
    state = load_file(str(directory / LORA_WEIGHTS))
    assert state and all(k.startswith("unet.") for k in state)
    assert all(".lora_A." in k or ".lora_B." in k for k in state), [k for k in state if "lora_" not in k][:3]
    assert len(state) == 2 * len(lora_layers(backbone.unet))
    assert all(v.dtype == torch.float32 for v in state.values())

    read, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(directory))[:2]
    assert set(read) == set(state)
    _, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(directory), return_lora_metadata=True)
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0


def test_a_diffusers_file_without_scale_layers_loads_with_its_own_alpha(saved_adapter, inputs):
    backbone, settings, directory = saved_adapter
    (directory / SCALE_WEIGHTS).unlink()
    for gain in scale_parameters(backbone.unet):
        gain.data.fill_(1.0)
    fresh = tiny_backbone()
    loaded = load_lora(fresh.unet, directory)
    assert loaded.rank == 4 and loaded.alpha == 8.0
    torch.testing.assert_close(noise(fresh, inputs), noise(backbone, inputs), rtol=1e-5, atol=1e-6)


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LoRAError, match="nowhere"):
        load_lora(tiny_backbone().unet, missing)
    with pytest.raises(LoRAError, match="nowhere"):
        read_adapter_info(missing)


def test_directory_without_the_lora_file_is_a_clear_error(tmp_path):
    (tmp_path / "README.md").write_text("not an adapter")
    with pytest.raises(LoRAError, match=re.escape(LORA_WEIGHTS)) as info:
        load_lora(tiny_backbone().unet, tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", [LORA_WEIGHTS, SCALE_WEIGHTS])
def test_corrupt_files_are_a_clear_error(saved_adapter, name):
    _, _, directory = saved_adapter
    (directory / name).write_bytes(b"\x00not a safetensors file")
    with pytest.raises(LoRAError, match=re.escape(str(directory / name))):
        load_lora(tiny_backbone().unet, directory)


def test_a_file_without_unet_weights_is_a_clear_error(tmp_path):
    save_file({"text_encoder.layer.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / LORA_WEIGHTS))
    with pytest.raises(LoRAError, match="unet"):
        load_lora(tiny_backbone().unet, tmp_path)


def test_rank_mismatch_is_a_clear_error(saved_adapter):
    _, settings, directory = saved_adapter
    with pytest.raises(LoRAError, match=re.escape(str(directory))) as info:
        load_lora(tiny_backbone().unet, directory, LoRASettings(rank=8, alpha=8.0, targets=settings.targets))
    assert "rank" in str(info.value)
    unet = tiny_backbone().unet
    add_lora(unet, LoRASettings(rank=2, targets=settings.targets))
    with pytest.raises(LoRAError, match=re.escape(str(directory))):
        load_lora(unet, directory)


def test_target_mismatch_is_a_clear_error(saved_adapter):
    _, _, directory = saved_adapter
    with pytest.raises(LoRAError, match=re.escape(str(directory))) as info:
        load_lora(tiny_backbone().unet, directory, LoRASettings(rank=4, alpha=8.0, targets="self_attention"))
    assert "targets" in str(info.value)


def test_saving_over_an_adapter_replaces_it_whole_with_readable_files(tmp_path):
    backbone = tiny_backbone()
    add_lora(backbone.unet, LoRASettings(rank=2))
    target = tmp_path / "adapter"
    save_lora(backbone.unet, target, extra_files=lambda d: (d / "gain_schedule.safetensors").write_bytes(b"stage 2"))
    assert (target / "gain_schedule.safetensors").is_file()
    save_lora(backbone.unet, target)  # a Stage-1 slider exported where a Stage-2 adapter was
    assert sorted(p.name for p in target.iterdir()) == ["pytorch_lora_weights.safetensors", "scale_layers.safetensors"]
    assert all(p.stat().st_mode & 0o044 for p in target.iterdir())  # group/other can read (mkstemp alone gives 0600)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directories left behind
