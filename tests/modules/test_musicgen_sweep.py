"""MusicGenSweepModule: strength sweeps of a MusicGen decoder LoRA; strength 0 is exactly the base model; the tiny config end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import undocumented_options

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.cli import main
from rlmusic_pl.lora import LoRAError, LoRASettings, add_lora, load_lora, lora_parameters, save_lora
from rlmusic_pl.modules import MusicGenSweepModule, SweepError

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "musicgen_sweep.yaml"
TINY_MUSICRL = ROOT / "configs" / "tiny" / "musicrl_clap.yaml"
FAST = dict(backbone="tiny", text_length=16, duration_s=0.2, top_k=8)


def make_adapter(directory: Path) -> Path:
    """A decoder LoRA on the tiny MusicGen with random non-zero weights, saved as MusicRL's fit saves its adapter."""
    backbone = MusicGenBackbone.load("tiny", text_length=16)
    add_lora(backbone.decoder, LoRASettings(rank=2, init_seed=0))
    generator = torch.Generator().manual_seed(1)
    for param in lora_parameters(backbone.decoder):
        param.data = 0.5 * torch.randn(param.shape, generator=generator)
    return save_lora(backbone.decoder, directory, {"kind": "MusicRLModule", "backbone": "tiny"}, layout="peft")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("musicrl") / "adapter")


def test_a_missing_adapter_says_to_train_the_tiny_musicrl_first(tmp_path):
    with pytest.raises(LoRAError, match=r"no such directory.*fit --config configs/tiny/musicrl_clap.yaml"):
        MusicGenSweepModule(adapter=str(tmp_path / "missing"), **FAST)
    (tmp_path / "unet_lora").mkdir()
    (tmp_path / "unet_lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(LoRAError, match="not a LoRA adapter of this backbone.*adapter_model.safetensors"):
        MusicGenSweepModule(adapter=str(tmp_path / "unet_lora"), **FAST)


def test_bad_sweeps_are_refused(adapter):
    with pytest.raises(SweepError, match="strengths must"):
        MusicGenSweepModule(adapter=str(adapter), strengths=[0.0, 0.0], **FAST)
    with pytest.raises(SweepError, match="seeds must"):
        MusicGenSweepModule(adapter=str(adapter), seeds=[-1], **FAST)


def test_strength_0_is_exactly_the_base_model_and_1_the_adapter(adapter, monkeypatch):
    module = MusicGenSweepModule(adapter=str(adapter), strengths=[0.0, 1.0, -1.0], seeds=[3], **FAST)
    module.configure_model()
    sampled = []
    sample = module.backbone.sample

    def recording_sample(*args, **kwargs):
        sampled.append(sample(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(module.backbone, "sample", recording_sample)
    clip = module.batch_clips({"prompt": ["a note"], "negative_prompt": [""], "attributes": [{}]}, [0.0])[0]
    waves = module.generate([clip], module.strengths)
    assert waves.shape == (3, module.expected_samples())
    codes = sampled[0].codes

    def alone(backbone: MusicGenBackbone) -> torch.Tensor:
        cond = backbone.encode_prompts(["a note"])
        return backbone.sample(cond, backbone.num_frames(0.2), top_k=8, generator=[torch.Generator().manual_seed(3)]).codes[0]

    base = MusicGenBackbone.load("tiny", text_length=16)
    assert torch.equal(codes[0], alone(base))  # strength 0: the base model's codes, bit for bit
    load_lora(base.decoder, adapter)
    assert torch.equal(codes[1], alone(base))  # strength 1: the adapter alone, though batched with other strengths
    assert not torch.equal(codes[1], codes[0]) and not torch.equal(codes[2], codes[0])


@pytest.mark.slow
def test_the_tiny_config_predicts_every_clip_with_a_table_and_plots(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlmusic_pl"])
    out = tmp_path / "sweep"
    main(args=["predict", "--config", str(TINY_CONFIG), f"--model.adapter={adapter}", f"--model.output_dir={out}",
               f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               "--model.duration_s=0.3"])
    rows = json.loads((out / "table.json").read_text())
    assert len(rows) == 2 * 2 * 3  # prompts x seeds x strengths
    assert sorted({r["strength"] for r in rows}) == [0.0, 0.5, 1.0]
    assert {"clap", "spectral_centroid", "ssim_to_strength0"} <= set(rows[0])
    assert all(r["ssim_to_strength0"] == pytest.approx(1.0) for r in rows if r["strength"] == 0.0)
    assert len(list((out / "audio").glob("*.wav"))) == len(rows)
    assert list((out / "plots").glob("*.png")) and (out / "index.html").is_file()


def test_every_argument_is_documented_in_the_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlmusic_pl"])
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(TINY_CONFIG), "--model.help", "rlmusic_pl.modules.MusicGenSweepModule"])
    out = capsys.readouterr().out
    assert "--model.strengths" in out and undocumented_options(out, "--model.") == {}


@pytest.mark.slow
def test_the_adapter_of_the_tiny_musicrl_fit_sweeps_from_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--trainer.enable_progress_bar=false", "--model.duration_s=0.2"]
    fit = [sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(TINY_MUSICRL), f"--trainer.default_root_dir={tmp_path / 'fit'}",
           "--trainer.max_epochs=1", f"--model.export_to={tmp_path / 'adapter'}", *common]
    predict = [sys.executable, "-m", "rlmusic_pl", "predict", "--config", str(TINY_CONFIG), f"--trainer.default_root_dir={tmp_path / 'sweep'}",
               f"--model.adapter={tmp_path / 'adapter'}", "--model.seeds=[0]", *common]
    for command in (fit, predict):
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "sweep" / "table.json").read_text())
    assert sorted(r["strength"] for r in rows) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]  # 2 prompts x 1 seed x 3 strengths
