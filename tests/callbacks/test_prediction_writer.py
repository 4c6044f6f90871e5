"""SweepWriter on hand-made predictions: WAVs, table (CSV = JSON), plots, mel grid; nothing rewritten when unchanged."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile
import torch

from rlmusic_pl.callbacks import Clip, SweepClips, SweepWriter
from rlmusic_pl.callbacks.prediction_writer import write_if_changed

SR = 16000
STRENGTHS = (-1.0, 0.0, 1.0)


def trainer() -> SimpleNamespace:
    return SimpleNamespace(loggers=[], world_size=1, is_global_zero=True, predict_dataloaders=None)


def prediction(prompt: str, item: int, attributes: dict, seeds=(0, 1), generated=True) -> SweepClips:
    clips, audio = [], {}
    for seed in seeds:
        for strength in STRENGTHS:
            clip = Clip(item, prompt, "noise", attributes, seed, strength, metrics={"loudness": strength + seed, "clap/x": 0.5})
            clips.append(clip)
            audio[clip.file_name] = 0.2 * torch.sin(torch.arange(SR // 4) * (0.05 + 0.01 * strength + 0.001 * seed))
    return SweepClips(clips=clips, new_audio=audio if generated else {}, sample_rate=SR)


def run(writer: SweepWriter, module, batches: list[tuple[SweepClips, list[int]]]) -> None:
    writer.on_predict_epoch_start(trainer(), module)
    for batch_idx, (pred, indices) in enumerate(batches):
        writer.write_on_batch_end(trainer(), module, pred, indices, {"prompt": [None] * len(indices)}, batch_idx, 0)
    writer.write_on_epoch_end(trainer(), module, [], [])


@pytest.fixture
def module(tmp_path):
    return SimpleNamespace(sweep_dir=tmp_path / "sweep", strengths=list(STRENGTHS), seeds=[0, 1])


def test_writes_wavs_table_plots_and_grid_in_prompt_order(module):
    writer = SweepWriter(progress=False)
    # the second prompt's batch arrives first (another rank, or another order): the table follows the dataset index
    run(writer, module, [(prediction("a sad piano", 0, {"emotion": "sad"}), [1]), (prediction("a happy piano", 0, {"emotion": "happy"}), [0])])
    out = module.sweep_dir

    wavs = sorted((out / "audio").glob("*.wav"))
    assert len(wavs) == 2 * 2 * len(STRENGTHS)
    assert all(soundfile.info(str(w)).subtype == "PCM_16" for w in wavs)
    rows = json.loads((out / "table.json").read_text())
    with open(out / "table.csv", newline="") as file:
        csv_rows = list(csv.DictReader(file))
    assert [(r["prompt_index"], r["seed"], r["strength"]) for r in rows] == [
        (p, s, x) for p in (0, 1) for s in (0, 1) for x in STRENGTHS
    ]
    assert rows[0]["prompt"] == "a happy piano" and rows[0]["attribute.emotion"] == "happy"
    assert list(csv_rows[0]) == list(rows[0]) == [
        "prompt_index", "prompt", "negative_prompt", "seed", "strength", "file", "attribute.emotion", "loudness", "clap/x"
    ]
    assert [float(r["loudness"]) for r in csv_rows] == [r["loudness"] for r in rows]
    assert all((out / r["file"]).is_file() for r in rows)
    assert {p.name for p in (out / "plots").glob("*.png")} == {"loudness.png", "clap_x.png"}
    assert (out / "mel_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_a_rerun_with_nothing_new_rewrites_nothing(module):
    run(SweepWriter(progress=False), module, [(prediction("a piano", 0, {}), [0])])
    out = module.sweep_dir
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run(SweepWriter(progress=False), module, [(prediction("a piano", 0, {}, generated=False), [0])])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_repeated_prompt_gives_one_row_per_clip(module):
    run(SweepWriter(progress=False, plots=False, mel_grid=False), module,
        [(prediction("a piano", 0, {}), [0]), (prediction("a piano", 0, {}, generated=False), [1])])
    rows = json.loads((module.sweep_dir / "table.json").read_text())
    assert len(rows) == 2 * len(STRENGTHS) and len({r["file"] for r in rows}) == len(rows)
    assert not (module.sweep_dir / "mel_grid.png").exists() and not (module.sweep_dir / "plots").exists()


def test_write_if_changed(tmp_path):
    path = tmp_path / "a" / "b.txt"
    assert write_if_changed(path, b"one") and path.read_bytes() == b"one"
    assert not write_if_changed(path, b"one")
    assert write_if_changed(path, b"two") and path.read_bytes() == b"two"


def test_new_clips_are_logged_to_tensorboard(module, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "logs")
    with_logger = SimpleNamespace(**{**vars(trainer()), "loggers": [logger]})
    writer = SweepWriter(progress=False, plots=False, mel_grid=False)
    pred = prediction("a piano", 0, {}, seeds=(0,))
    writer.on_predict_epoch_start(with_logger, module)
    writer.write_on_batch_end(with_logger, module, pred, [0], {"prompt": ["a piano"]}, 0, 0)
    logger.experiment.flush()
    events = EventAccumulator(str(logger.log_dir), size_guidance={"audio": 0}).Reload()
    assert sorted(events.Tags()["audio"]) == sorted(f"sweep/{Path(name).stem}" for name in pred.new_audio)
