"""SweepModule: clear errors for bad arguments, and end-to-end sweeps of the tiny configs (resumable, DDP, listening page)."""

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import soundfile
import torch
from browser import chromium, network_events, require_chromium, serve
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
PROMPTS_WITH_SCRIPT = PROMPTS + 1  # and the prompt of the listening page's test
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


def record_generated_clips(monkeypatch) -> list[str]:
    """The file names of the clips SweepModule generates from now on (whatever writes them, or not)."""
    generated: list[str] = []
    generate = SweepModule.generate

    def recording_generate(self, clips, strengths):
        generated.extend(replace(clip, strength=s).file_name for clip in clips for s in strengths)
        return generate(self, clips, strengths)

    monkeypatch.setattr(SweepModule, "generate", recording_generate)
    return generated


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
def test_tiny_sweep_writes_every_clip_a_table_and_plots_and_resumes(adapter, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    generated = record_generated_clips(monkeypatch)
    predict(adapter, out)

    wavs = sorted((out / "audio").glob("*.wav"))
    assert len(wavs) == PROMPTS * STRENGTHS * SEEDS
    assert sorted(generated) == [wav.name for wav in wavs]  # each clip generated once
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
    assert (out / "index.html").is_file() and len(list((out / "mels").glob("*.png"))) == len(wavs)
    assert all(r["ssim_to_strength0"] == pytest.approx(1.0) for r in rows if r["strength"] == 0.0)
    assert any(r["ssim_to_strength0"] < 0.99 for r in rows)  # the adapter changes the clips

    # the table's metrics are those of the written files
    row = next(r for r in rows if r["strength"] == 1.0 and r["seed"] == 1)
    wave = load_audio(out / row["file"], SR)[None]
    reference = load_audio(out / row["file"].replace("strength+1_", "strength+0_"), SR)[None]
    assert row["spectral_centroid"] == pytest.approx(SpectralCentroidReward()(wave, SR, [row["prompt"]], [{}]).item(), rel=1e-5)
    assert row["ssim_to_strength0"] == pytest.approx(mel_ssim(wave, reference, SR).item(), abs=1e-5)

    # a second run generates nothing and writes nothing
    generated.clear()
    before = modification_times(out)
    predict(adapter, out)
    assert generated == []
    assert modification_times(out) == before

    # a deleted clip, and only it, is generated again (the same clip: same noise, batch-independent)
    deleted = wavs[3]
    original = load_audio(deleted, SR)
    deleted.unlink()
    predict(adapter, out)
    assert generated == [deleted.name]
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


# ------------------------------------------------------------------------------ listening page
SCRIPT_PROMPT = "A \"quoted\" 'tender' piano <script>alert(1)</script> & more"
ROWS_OF_PLAYERS = """return Array.from(document.querySelectorAll("tr.clip-row"))
    .map(row => Array.from(row.querySelectorAll("audio")))
    .map(players => players.map(p => ({src: p.currentSrc, ready: p.readyState, error: p.error && p.error.code})))"""
RECORD_PLAYS = "window.started = []; document.addEventListener('play', e => started.push(e.target.currentSrc), true)"
FIRST_ROW_PLAYED = """const players = Array.from(document.querySelector("tr.clip-row").querySelectorAll("audio"));
    return started.length === players.length && players[players.length - 1].ended"""
BROWSER_SCHEMES = ("chrome", "chrome-untrusted", "devtools")
MEDIA_SETTLED = """return Array.from(document.querySelectorAll("audio")).every(a => a.readyState >= 1 || a.error)
    && Array.from(document.images).every(img => img.complete)"""


@pytest.mark.slow
def test_the_listening_page_of_the_tiny_sweep_in_headless_chromium(adapter, tmp_path):
    require_chromium()  # before the sweep: skip at once where there is no browser
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps({"prompt": SCRIPT_PROMPT, "emotion": "sad"}) + "\n")
    out = tmp_path / "sweep"
    predict(adapter, out, f"--data.prompt_file={prompt_file}")
    table = json.loads((out / "table.json").read_text())
    expected: dict[tuple, list] = {}
    for row in sorted(table, key=lambda row: (row["prompt_index"], row["seed"], row["strength"])):
        expected.setdefault((row["prompt_index"], row["seed"]), []).append("/" + row["file"])

    with serve(out) as (base, requests), chromium(tmp_path / "profile") as browser:
        network_events(browser)  # the browser's own start-up traffic is not the page's
        browser.get(f"{base}/index.html")
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(MEDIA_SETTLED))
        with pytest.raises(NoAlertPresentException):  # the prompt's script did not run
            browser.switch_to.alert  # noqa: B018
        players = browser.execute_script(ROWS_OF_PLAYERS)
        if os.environ.get("RLMUSIC_UPDATE_DOCS"):
            save_screenshot(browser, ROOT / "docs" / "sweep_page.png")

        # one player per clip of the table, each row in strength order, every source loaded
        assert sum(map(len, players)) == len(table) == PROMPTS_WITH_SCRIPT * STRENGTHS * SEEDS
        assert [[unquote(urlparse(p["src"]).path) for p in row] for row in players] == list(expected.values())
        assert all(p["ready"] >= 1 and p["error"] is None for row in players for p in row)
        assert browser.execute_script("return Array.from(document.images).every(img => img.naturalWidth > 0)")

        # the prompt is text; the only script is the page's own (and it runs: the row plays in order)
        assert SCRIPT_PROMPT in [element.text for element in browser.find_elements(By.CSS_SELECTOR, "p.prompt")]
        assert browser.execute_script("return document.scripts.length") == 1
        browser.execute_script(RECORD_PLAYS)
        browser.find_element(By.CSS_SELECTOR, "tr.clip-row button.play-row").click()
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(FIRST_ROW_PLAYED))
        assert browser.execute_script("return started") == [p["src"] for p in players[0]]

        # nothing failed, nothing left the local server
        events = network_events(browser)
        console = browser.get_log("browser")
    # The page's requests are those sent since it was opened; the browser's own pages (the new-tab page it
    # opens first) load from chrome:// or started before, and may still fail to reach the internet.
    sent = [event["params"] for event in events if event["method"] == "Network.requestWillBeSent"]
    requested = {params["requestId"]: params["request"]["url"] for params in sent
                 if urlparse(params["request"]["url"]).scheme not in BROWSER_SCHEMES}
    assert requested and all(url.startswith((f"{base}/", "data:")) for url in requested.values()), requested
    page_events = [event for event in events if event["params"].get("requestId") in requested]
    assert [event for event in page_events if event["method"] == "Network.loadingFailed"] == []
    responses = [event["params"]["response"] for event in page_events if event["method"] == "Network.responseReceived"]
    assert responses and all(response["status"] < 400 for response in responses)
    assert all(status < 400 for _, status in requests)
    assert {unquote(path) for path, _ in requests} >= {file for files in expected.values() for file in files}
    assert [entry for entry in console if entry["level"] == "SEVERE"] == []


def save_screenshot(browser, path: Path) -> None:
    """The whole page as a PNG at ``path`` (the README's picture of the page), in 256 colours to keep it small."""
    from PIL import Image

    width, height = browser.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    browser.set_window_size(max(width, 1200), height + 150)
    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB").quantize(colors=256)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
