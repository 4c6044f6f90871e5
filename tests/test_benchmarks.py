"""Benchmark scripts that other benchmarks and configs depend on: the trained tiny backbone, the memory counter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.tiny import build_tiny_pipeline
from rlmusic_pl.data.audio import UMASK

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_backbone(tmp_path_factory) -> tuple[Path, str]:
    """benchmarks/train_tiny_backbone.py with a few steps per stage: its output directory and stdout."""
    out = tmp_path_factory.mktemp("backbone") / "tiny-trained"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_tiny_backbone.py"), str(out), "--clips", "8", "--batch-size", "4",
        "--vocoder-steps", "2", "--vae-steps", "2", "--unet-steps", "2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def test_train_tiny_backbone_writes_a_loadable_trained_pipeline(trained_backbone):
    out, stdout = trained_backbone
    assert "unet step 2/2" in stdout
    trained = AudioLDM2Backbone.load(str(out))
    random = build_tiny_pipeline(0)
    assert trained.vae.config.scaling_factor != random.vae.config.scaling_factor
    for name in ("vocoder", "vae", "unet"):
        before = torch.cat([p.flatten() for p in getattr(random, name).parameters()])
        after = torch.cat([p.flatten() for p in getattr(trained, name).parameters()])
        assert not torch.equal(before, after), f"{name} was not trained"
    assert not list(out.parent.glob(".tiny-trained.*")), "the staging directory was left behind"
    directories = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {p.stat().st_mode & 0o777 for p in directories} == {0o777 & ~UMASK}, "directories keep mkdtemp's owner-only mode"


def test_train_tiny_backbone_retrains_only_the_named_stages_of_an_existing_model(trained_backbone, tmp_path):
    out, _ = trained_backbone
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_tiny_backbone.py"), str(tmp_path / "revoiced"), "--init", str(out),
        "--stages", "vocoder", "--clips", "4", "--batch-size", "2", "--vocoder-steps", "2", "--vocoder-channels", "8",
        "--vocoder-linear-weight", "1", "--threads", "1",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vae step" not in result.stdout and "unet step" not in result.stdout
    before, after = AudioLDM2Backbone.load(str(out)), AudioLDM2Backbone.load(str(tmp_path / "revoiced"))
    assert after.vocoder.config.upsample_initial_channel == 8
    for name in ("vae", "unet"):
        for a, b in zip(getattr(before, name).parameters(), getattr(after, name).parameters()):
            assert torch.equal(a, b), f"{name} changed although only the vocoder was retrained"


def test_slider_audio_trains_the_slider_and_reports_the_audio_figures(trained_backbone, tmp_path):
    out, _ = trained_backbone
    command = [
        sys.executable, str(ROOT / "benchmarks" / "slider_audio.py"), "--backbone", str(out), "--export-to", str(tmp_path / "slider"),
        "--root-dir", str(tmp_path / "run"), "--sets", str(tmp_path / "sets"), "--count", "2", "--prompts", "a soft flute",
        "--seeds", "5", "--num-steps", "2", "--stage2", str(tmp_path / "slider"), "--grid", "3",
        "--fit-args", f"--data.init_args.contrast.init_args.directory={tmp_path / 'sets'}", "--data.init_args.contrast.init_args.count=2",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--model.val_num_steps=2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "slider" / "pytorch_lora_weights.safetensors").is_file()
    for line in ("minus s=-1", "bright - dull training sets", "monotone in strength", "Stage 2"):
        assert line in result.stdout, result.stdout
    base_diff = float(result.stdout.split("largest waveform difference ")[1].split()[0])
    assert base_diff < 1e-4, "the unsteered output (s = 0) is not the base model's"


@pytest.mark.slow
def test_the_learning_config_fits_on_a_trained_backbone_directory(trained_backbone, tmp_path):
    out, _ = trained_backbone
    command = [
        sys.executable, "-m", "rlmusic_pl", "fit", "--config", str(ROOT / "configs/tiny/ddpo_learning.yaml"),
        f"--model.backbone={out}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--model.num_steps=2", "--model.samples_per_prompt=2", "--model.stat_min_count=2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(tmp_path.glob("lightning_logs/version_*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"train/reward/total", "val/reward/total"} <= set(events.Tags()["scalars"])
    assert (run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_tensor_memory_counts_live_storages_once_and_releases_freed_ones():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from full_size_memory import TensorMemory

    mib = 2**20
    with TensorMemory() as memory:
        first = torch.zeros(mib // 4)  # 1 MiB of float32
        view = first[: mib // 8]  # a view allocates nothing
        first.add_(1.0)  # nor does an in-place op
        del first, view
        second = torch.ones(mib // 2)  # 2 MiB, after the first was freed
    assert memory.peak == 2 * mib
    assert memory.live == 2 * mib
    del second
    assert memory.live == 0


def test_tensor_memory_does_not_count_views_of_tensors_made_before_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from full_size_memory import TensorMemory

    weight, x = torch.randn(256, 512), torch.randn(4, 512)
    with TensorMemory() as memory:
        transposed = weight.t()  # what linear does to every weight
        weight.mul_(1.0)
        y = torch.nn.functional.linear(x, weight)
    assert memory.peak == y.untyped_storage().nbytes() == 4 * 256 * 4
    del transposed
