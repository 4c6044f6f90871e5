"""Benchmark scripts that other benchmarks and configs depend on: the trained tiny backbones, the memory counter; the DPO speed and learning scripts run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.musicgen import MusicGenBackbone
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


def test_the_vocoder_loss_sees_the_drift_below_the_mels_lowest_band():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_tiny_backbone import linear_magnitude_loss
    from rlmusic_pl.data.audio import log_mel

    time = torch.arange(16000) / 16000
    clip = (0.3 * torch.sin(2 * torch.pi * 220 * time) + 0.1 * torch.sin(2 * torch.pi * 660 * time))[None]
    drifted = clip + 0.3 * torch.cos(2 * torch.pi * 5 * time)  # a slow drift, as the untreated tiny vocoder made
    assert linear_magnitude_loss(clip, clip, log_mel(clip), log_mel(clip)).item() < 0.02  # the window's leakage below 40 Hz alone
    mel_alone = ((log_mel(drifted).exp() - log_mel(clip).exp()).norm() / log_mel(clip).exp().norm()).item()
    # the mel's lowest band sees little of it
    assert linear_magnitude_loss(drifted, clip, log_mel(drifted), log_mel(clip)).item() > 5 * mel_alone


def test_slider_audio_trains_the_slider_and_reports_the_audio_figures(trained_backbone, tmp_path):
    out, _ = trained_backbone
    command = [
        sys.executable, str(ROOT / "benchmarks" / "slider_audio.py"), "--backbone", str(out), "--export-to", str(tmp_path / "slider"),
        "--root-dir", str(tmp_path / "run"), "--sets", str(tmp_path / "sets"), "--count", "2", "--prompts", "a soft flute",
        "--seeds", "5", "--num-steps", "2", "--stage2", str(tmp_path / "slider"), "--grid", "3", "--schedule", "interior:0,0", "interior:0.5,-0.5",
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
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("Stage 1", "interior:"))]
    figures = {" ".join(row[:-9]): row[-9:-2] for row in rows}  # R2, max jump, range, two stability means (stds)
    timing = {" ".join(row[:-9]): [float(x) for x in row[-2:]] for row in rows}  # seconds, ratio to Stage 1
    assert timing["Stage 1"][1] == 1.0 and all(seconds > 0 for seconds, _ in timing.values())
    assert figures["interior:0,0"] == figures["Stage 1"]  # a zero schedule is the slider itself
    assert figures["interior:0.5,-0.5"][2] == figures["Stage 1"][2]  # the range (s = 1 untouched)
    assert figures["interior:0.5,-0.5"][0] != figures["Stage 1"][0]  # the strength between is bent


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


def train_tiny_musicgen(out: Path, seed: int = 0) -> str:
    """benchmarks/train_tiny_musicgen.py with two steps per stage into ``out``; its stdout."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_tiny_musicgen.py"), str(out), "--clips", "16", "--batch-size", "4",
        "--codec-steps", "2", "--decoder-steps", "2", "--hidden-size", "32", "--layers", "1", "--seed", str(seed),
    ]
    # ~10 s of CPU; the generous timeout is for a machine shared with other jobs.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained_musicgen(tmp_path_factory) -> tuple[Path, str]:
    """The output directory of a short train_tiny_musicgen.py run, and its stdout."""
    out = tmp_path_factory.mktemp("musicgen") / "tiny-musicgen-trained"
    return out, train_tiny_musicgen(out)


def test_train_tiny_musicgen_writes_a_trained_musicgen_that_the_backbone_loads_and_samples(trained_musicgen):
    out, stdout = trained_musicgen
    assert "codec step 2/2" in stdout and "decoder step 2/2" in stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_tiny_musicgen import build_untrained

    trained = MusicGenBackbone.load(str(out))
    untrained = build_untrained(0, hidden_size=32, num_layers=1)
    assert (trained.sample_rate, trained.codebook_size, trained.num_codebooks, trained.frame_rate) == (8000, 64, 4, 50)
    for name in ("audio_encoder", "decoder"):
        before = torch.cat([p.flatten() for p in getattr(untrained, name).parameters()])
        after = torch.cat([p.flatten() for p in getattr(trained, name).parameters()])
        assert not torch.equal(before, after), f"{name} was not trained"
    # transformers initialises the codebooks to zero; k-means++ and the EMA updates fill them with distinct codes.
    for layer in trained.audio_encoder.quantizer.layers[: trained.num_codebooks]:
        assert torch.unique(layer.codebook.embed, dim=0).shape[0] > trained.codebook_size // 2
    assert not list(out.parent.glob(".tiny-musicgen-trained.*")), "the staging directory was left behind"
    cond = trained.encode_prompts(["a bright C note", "a dull G note"])
    sample = trained.sample(cond, trained.num_frames(0.2), generator=torch.Generator().manual_seed(0))
    audio = trained.decode(sample.codes)
    assert audio.shape == (2, round(0.2 * trained.sample_rate)) and torch.isfinite(audio).all()


@pytest.mark.slow
def test_train_tiny_musicgen_is_deterministic_by_seed(trained_musicgen, tmp_path):
    out, _ = trained_musicgen
    train_tiny_musicgen(tmp_path / "again")
    train_tiny_musicgen(tmp_path / "other", seed=1)
    weights = [(directory / "model.safetensors").read_bytes() for directory in (out, tmp_path / "again", tmp_path / "other")]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_kmeans_plus_plus_finds_separated_clusters():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_tiny_musicgen import kmeans_plus_plus

    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vectors = (means[:, None] + 0.1 * torch.randn(3, 50, 2, generator=generator)).reshape(-1, 2)
    centres = kmeans_plus_plus(vectors, 3, generator)
    assert torch.cdist(means, centres).min(dim=1).values.max() < 0.1


def test_tiny_musicgen_quality_reports_codec_and_conditioning_for_trained_and_random(trained_musicgen):
    out, _ = trained_musicgen
    command = [sys.executable, str(ROOT / "benchmarks" / "tiny_musicgen_quality.py"), str(out), "--clips", "4", "--guidance-scales", "1", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("trained", "random"):
        assert f"{name} codec: log-mel L1" in result.stdout
        assert f"{name} conditioning: pitch_accuracy@1" in result.stdout and "pitch_accuracy@3" in result.stdout
    assert "centroid bright / dull (Hz)@3" in result.stdout


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


def test_dpo_speed_runs_both_sides_and_reports_the_ratio():
    command = [sys.executable, str(ROOT / "benchmarks" / "dpo_speed.py"), "--repeats", "1", "--pairs", "1", "--duration", "0.5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 pairs of 0.5 s clips" in result.stdout and "ratio" in result.stdout


@pytest.mark.slow
def test_dpo_learning_runs_dpo_and_ddpo_at_matched_judge_calls():
    command = [sys.executable, str(ROOT / "benchmarks" / "dpo_learning.py"), "--clips-per-prompt", "2", "--dpo-steps", "1",
               "--dpo-batch", "2", "--held-out-samples", "1", "--steps", "2", "--ddpo-samples", "4", "--duration", "0.5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| Diffusion-DPO | 16 |" in result.stdout and "| DDPO (1 epochs) | 16 |" in result.stdout


@pytest.mark.slow
def test_the_preference_benchmark_runs_its_whole_chain_and_writes_its_table(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "preference_learning.py"), "--backbone", "tiny", "--out", str(tmp_path),
        "--prompts", "2", "--clips-per-prompt", "2", "--rm-epochs", "1", "--epochs", "1", "--kl-coefs", "0", "0.1",
        "--steps", "2", "--duration", "0.5",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out pair accuracy" in result.stdout and "| 0.1 |" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["kl_coef"] for row in results["ddpo"]] == [0.0, 0.1]
    assert (tmp_path / "reward_model" / "reward_model.safetensors").is_file()
