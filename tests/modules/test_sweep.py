"""SweepModule: clear errors for bad arguments, and end-to-end sweeps of the tiny configs (resumable, DDP)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
from lightning import Trainer

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.cli import main
from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.audio import load_audio
from rlmusic_pl.lora import LORA_WEIGHTS, LoRAError, LoRASettings, add_lora, lora_parameters, save_lora
from rlmusic_pl.modules import SweepError, SweepModule
from rlmusic_pl.rewards import EmotionReward, RewardError, SpectralCentroidReward
from rlmusic_pl.rewards.stability import mel_ssim

ROOT = Path(__file__).resolve().parents[2]
TINY_SWEEP = str(ROOT / "configs" / "tiny" / "sweep.yaml")
PROMPTS, STRENGTHS, SEEDS = 2, 5, 2  # what configs/tiny/sweep.yaml sweeps
DURATION_S = 0.5
SR = 16000


def make_adapter(directory: Path, kind: str = "SliderModule") -> Path:
    """A LoRA on the tiny backbone with random non-zero weights, saved like the fit runs save theirs."""
    backbone = AudioLDM2Backbone.load("tiny")
    add_lora(backbone.unet, LoRASettings(rank=2, init_seed=0))
    generator = torch.Generator().manual_seed(1)
    for param in lora_parameters(backbone.unet):
        param.data = 0.3 * torch.randn(param.shape, generator=generator)
    return save_lora(backbone.unet, directory, {"kind": kind, "backbone": "tiny"})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("slider") / "adapter")


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlmusic_pl"])


def predict(adapter: Path, out: Path, *extra: str) -> None:
    main(args=["predict", "--config", TINY_SWEEP, f"--model.adapter={adapter}", f"--model.output_dir={out}",
               f"--trainer.default_root_dir={out.parent}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               f"--model.duration_s={DURATION_S}", "--model.num_steps=2", *extra])


def modification_times(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------- errors
def test_missing_adapter_says_to_train_the_stage1_slider_first(tmp_path):
    with pytest.raises(LoRAError, match=r"no such directory.*fit --config configs/tiny/slider_stage1.yaml"):
        SweepModule(adapter=str(tmp_path / "missing"), backbone="tiny")


def test_a_directory_or_file_that_is_not_a_lora_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="not a LoRA adapter"):
        SweepModule(adapter=str(tmp_path / "empty"), backbone="tiny")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoRAError, match="not a LoRA adapter"):
        SweepModule(adapter=str(tmp_path / "notes.txt"), backbone="tiny")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / LORA_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        SweepModule(adapter=str(corrupt), backbone="tiny")


@pytest.mark.parametrize("strengths", [[], ["strong"], [0.0, None], [0.0, float("nan")], [True, 0.0], "0.5", [0.5, 0.5]])
def test_bad_strength_lists_are_refused(adapter, strengths):
    with pytest.raises(SweepError, match="strengths must"):
        SweepModule(adapter=str(adapter), strengths=strengths, backbone="tiny")


def test_bad_seeds_and_start_fraction_are_refused(adapter):
    with pytest.raises(SweepError, match="seeds must"):
        SweepModule(adapter=str(adapter), seeds=[], backbone="tiny")
    with pytest.raises(SweepError, match="start_fraction"):
        SweepModule(adapter=str(adapter), start_fraction=1.0, backbone="tiny")


def test_cli_refuses_strengths_that_are_not_numbers(adapter, tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict(adapter, tmp_path / "sweep", "--model.strengths=[low, high]")
    assert "strengths" in capsys.readouterr().err


def test_an_output_directory_that_cannot_be_written_is_refused_before_loading(adapter, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    module = SweepModule(adapter=str(adapter), output_dir=str(blocker / "sweep"), backbone="tiny")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(SweepError, match=r"output_dir .*a_file/sweep: cannot write there"):
        trainer.predict(module, PromptAttributeDataModule(prompts=["a piano"]))
    assert module.backbone is None


def test_a_metric_needing_an_attribute_the_prompts_lack_is_refused_before_loading(adapter, tmp_path):
    module = SweepModule(adapter=str(adapter), output_dir=str(tmp_path / "sweep"), backbone="tiny", duration_s=DURATION_S,
                         num_steps=2, metrics=[SpectralCentroidReward(), EmotionReward(n_channels=8, mode="probability")])
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RewardError, match="predict prompts: reward 'emotion': prompt 'a piano' has no 'emotion' attribute"):
        trainer.predict(module, PromptAttributeDataModule(prompts=["a piano"]))
    assert module.backbone is None


def test_the_adapter_kind_is_read_from_its_metadata(tmp_path):
    ddpo = make_adapter(tmp_path / "ddpo", kind="DDPOModule")
    assert SweepModule(adapter=str(ddpo), backbone="tiny").adapter_kind == "DDPOModule"
    # the LoRA file itself names its directory too
    assert SweepModule(adapter=str(ddpo / LORA_WEIGHTS), backbone="tiny").adapter_path == ddpo


# ------------------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_tiny_sweep_writes_every_clip_a_table_and_plots_and_resumes(adapter, tmp_path):
    out = tmp_path / "sweep"
    predict(adapter, out)

    wavs = sorted((out / "audio").glob("*.wav"))
    assert len(wavs) == PROMPTS * STRENGTHS * SEEDS
    for wav in wavs:
        info = soundfile.info(str(wav))
        assert (info.samplerate, info.frames, info.subtype) == (SR, int(DURATION_S * SR), "PCM_16")
    rows = json.loads((out / "table.json").read_text())
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(rows) == len(csv_lines) - 1 == len(wavs)
    assert {(r["prompt_index"], r["seed"], r["strength"]) for r in rows} == {
        (p, s, x) for p in range(PROMPTS) for s in (0, 1) for x in (-1.0, -0.5, 0.0, 0.5, 1.0)
    }
    metrics = ["clap", "emotion_probability", "spectral_centroid", "ssim_to_strength0"]
    assert all(name in rows[0] for name in metrics) and rows[0]["attribute.emotion"] == "happy"
    assert {p.name for p in (out / "plots").glob("*.png")} == {f"{name}.png" for name in metrics}
    assert (out / "mel_grid.png").stat().st_size > 0
    assert all(r["ssim_to_strength0"] == pytest.approx(1.0) for r in rows if r["strength"] == 0.0)
    assert any(r["ssim_to_strength0"] < 0.99 for r in rows)  # the adapter changes the clips

    # the table's metrics are those of the written files
    row = next(r for r in rows if r["strength"] == 1.0 and r["seed"] == 1)
    wave = load_audio(out / row["file"], SR)[None]
    reference = load_audio(out / row["file"].replace("strength+1_", "strength+0_"), SR)[None]
    assert row["spectral_centroid"] == pytest.approx(SpectralCentroidReward()(wave, SR, [row["prompt"]], [{}]).item(), rel=1e-5)
    assert row["ssim_to_strength0"] == pytest.approx(mel_ssim(wave, reference, SR).item(), abs=1e-5)

    # a second run writes nothing
    before = modification_times(out)
    predict(adapter, out)
    assert modification_times(out) == before

    # a deleted clip, and only it, is generated again (the same clip: same noise, batch-independent)
    deleted = wavs[3]
    original = load_audio(deleted, SR)
    deleted.unlink()
    predict(adapter, out)
    after = modification_times(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert {name for name in changed if name.startswith("audio/")} == {f"audio/{deleted.name}"}
    assert torch.allclose(load_audio(deleted, SR), original, atol=2e-3)


@pytest.mark.slow
def test_validate_reports_clap_similarity_and_emotion_accuracy(adapter, tmp_path, capsys):
    main(args=["validate", "--config", TINY_SWEEP, f"--model.adapter={adapter}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--model.duration_s={DURATION_S}", "--model.num_steps=2"])
    printed = capsys.readouterr().out
    for metric in ("val/clap_similarity", "val/emotion_accuracy", "val/emotion_accuracy/happy", "val/emotion_accuracy/sad"):
        assert metric in printed


@pytest.mark.slow
def test_two_processes_split_the_sweep_and_write_the_same_table(adapter, tmp_path):
    single, split = tmp_path / "single" / "sweep", tmp_path / "ddp" / "sweep"
    predict(adapter, single)
    command = [sys.executable, "-m", "rlmusic_pl", "predict", "--config", TINY_SWEEP, f"--model.adapter={adapter}",
               f"--model.output_dir={split}", f"--trainer.default_root_dir={split.parent}", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", f"--model.duration_s={DURATION_S}", "--model.num_steps=2",
               "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (split / "table.csv").read_text() == (single / "table.csv").read_text()
    assert len(list((split / "audio").glob("*.wav"))) == PROMPTS * STRENGTHS * SEEDS


def test_an_output_directory_of_a_sweep_with_other_settings_is_refused(adapter, tmp_path):
    def run(adapter_dir: Path = adapter, num_steps: int = 2) -> None:
        module = SweepModule(adapter=str(adapter_dir), output_dir=str(tmp_path / "sweep"), backbone="tiny", strengths=[0.0, 1.0],
                             seeds=[0], duration_s=DURATION_S, num_steps=num_steps)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.predict(module, PromptAttributeDataModule(prompts=["a piano"]), return_predictions=False)

    run()
    assert json.loads((tmp_path / "sweep" / "sweep_settings.json").read_text())["num_steps"] == 2
    run()  # the same settings: resumes
    with pytest.raises(SweepError, match="num_steps differ"):
        run(num_steps=3)
    with pytest.raises(SweepError, match="adapter_sha256 differ"):
        run(adapter_dir=make_adapter(tmp_path / "other", kind="DDPOModule"))
