"""SteeringModule: learn directions on the tiny MusicGen from a concept folder, then steered sweeps through SweepWriter."""

import csv
import json
import math

import pytest
import torch
from lightning import Trainer

from rlmusic_pl.backbone.musicgen import MusicGenBackbone
from rlmusic_pl.callbacks import SweepWriter
from rlmusic_pl.data.audio import load_audio, write_wav
from rlmusic_pl.data.concepts import ConceptDataModule
from rlmusic_pl.data.datamodule import PromptAttributeDataModule
from rlmusic_pl.modules.steering import SteeringModule, stratified_split
from rlmusic_pl.rewards.base import CallableReward
from rlmusic_pl.steering.directions import ConceptDirections
from rlmusic_pl.steering.probes import ProbeError
from rlmusic_pl.steering.steer import SteeringError

SAMPLE_RATE = 16_000
FAST = dict(backbone="tiny", text_length=16, search_trials=1, rfm_iters=3)


def trainer(root, **args) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **args)


def audible_codes(backbone: MusicGenBackbone) -> MusicGenBackbone:
    """The tiny preset's codebooks are all zero (every code decodes alike): fill them so that the audio follows the codes."""
    generator = torch.Generator().manual_seed(0)
    for layer in backbone.audio_encoder.quantizer.layers:
        layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=generator))
    return backbone


def tone_folder(folder, per_class: int = 6):
    """Low (220 Hz) and high (1760 Hz) tones of 0.3 s, labelled, plus one broken file in the labels."""
    rows = []
    for label, frequency in (("low", 220.0), ("high", 1760.0)):
        for index in range(per_class):
            time = torch.arange(int(0.3 * SAMPLE_RATE)) / SAMPLE_RATE
            wave = 0.4 * torch.sin(2 * math.pi * frequency * (1 + 0.01 * index) * time)
            write_wav(folder / label / f"{index}.wav", wave, SAMPLE_RATE)
            rows.append({"file": f"{label}/{index}.wav", "pitch": label})
    (folder / "broken.wav").write_bytes(b"not audio")
    rows.append({"file": "broken.wav", "pitch": "low"})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "pitch"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("rfm")
    folder = tone_folder(root / "concepts")
    data = ConceptDataModule(str(folder), label="pitch", backbone="tiny", batch_size=4, progress=False)
    module = SteeringModule(task="multiclass", export_to=str(root / "exported"), **FAST)
    trainer(root).fit(module, datamodule=data)
    return root, folder, module


def test_fit_learns_and_saves_directions_for_every_class_and_layer(learned, capsys):
    root, folder, module = learned
    directions = ConceptDirections.load(root / "directions")
    assert directions.concepts == ["high", "low"] and directions.layers == [0, 1]
    assert directions.directions.shape == (2, 2, 1, 64) and directions.method == "rfm" and directions.label == "pitch"
    assert ((directions.scores >= 0) & (directions.scores <= 1)).all()
    assert ConceptDirections.load(root / "directions_linear").method == "linear"
    assert ConceptDirections.load(root / "exported").concepts == ["high", "low"]
    assert {f"probe/rfm/low/layer{i}" for i in (0, 1)} <= set(module.trainer.callback_metrics)


def test_codes_are_cached_once_and_bad_files_reported(learned, capsys):
    _, folder, _ = learned
    manifest = [json.loads(line) for line in (folder / "codes" / "tiny-seed0" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 12 and "broken.wav" not in {e["source"] for e in manifest}
    data = ConceptDataModule(str(folder), label="pitch", backbone="tiny", progress=False)
    data.load_backbone = lambda: pytest.fail("everything is cached: the backbone must not load")
    with pytest.raises(pytest.fail.Exception):  # the broken file is retried, so the backbone is needed
        data.prepare_data()
    (folder / "labels.csv").write_text("\n".join(l for l in (folder / "labels.csv").read_text().splitlines() if "broken" not in l))
    data.prepare_data()
    data.setup()
    assert len(data.items) == 12


def test_the_sweep_steers_with_each_coefficient_and_coefficient_zero_is_unsteered(learned):
    root, _, _ = learned
    module = SteeringModule(directions=str(root / "directions"), concept="high", coefficients=[0.0, 8.0, -8.0], seeds=[3],
                            duration_s=0.2, top_k=8, output_dir=str(root / "sweep"),
                            metrics=[CallableReward(lambda w, sr, p, a: torch.tensor([float(x["steer_concept"] == "high") for x in a]), "targets_high")],
                            **FAST)
    module.configure_model()
    audible_codes(module.backbone)
    prompts = PromptAttributeDataModule(prompts=["a note"])
    trainer(root, callbacks=[SweepWriter(progress=False, log_audio=False)]).predict(module, prompts)
    rows = json.loads((root / "sweep" / "table.json").read_text())
    assert sorted(r["strength"] for r in rows) == [-8.0, 0.0, 8.0]
    assert all(r["attribute.steer_concept"] == "high" and r["targets_high"] == 1.0 for r in rows)
    page = (root / "sweep" / "index.html").read_text()
    assert "coefficient +8" in page and "coefficient -8" in page
    by_coefficient = {r["strength"]: r for r in rows}
    assert by_coefficient[0.0]["ssim_to_strength0"] == pytest.approx(1.0)
    audio = {value: load_audio(root / "sweep" / row["file"], SAMPLE_RATE) for value, row in by_coefficient.items()}
    assert not torch.equal(audio[8.0], audio[0.0]) and not torch.equal(audio[-8.0], audio[0.0])

    # Coefficient 0 is the unsteered model's clip for that seed.
    backbone = audible_codes(MusicGenBackbone.load("tiny", text_length=16))
    codes = backbone.sample(backbone.encode_prompts(["a note"]), backbone.num_frames(0.2), top_k=8, generator=[torch.Generator().manual_seed(3)]).codes
    unsteered = module.generate([module.batch_clips({"prompt": ["a note"], "negative_prompt": [""], "attributes": [{}]}, [0.0])[0]], [0.0])
    assert torch.allclose(unsteered[0], backbone.decode(codes)[0])


def test_bad_settings_are_refused():
    with pytest.raises(SteeringError, match="schedule must be one of"):
        SteeringModule(schedule="cosine", **FAST)
    with pytest.raises(SteeringError, match="inject_chance"):
        SteeringModule(inject_chance=1.5, **FAST)
    with pytest.raises(ProbeError, match="probe_val_fraction"):
        SteeringModule(probe_val_fraction=1.0, **FAST)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = ["a"] * 4 + ["b"] * 8
    mask = stratified_split(labels, 0.25, seed=0)
    assert mask[:4].sum() == 1 and mask[4:].sum() == 2
    with pytest.raises(ProbeError, match="single clip"):
        stratified_split(["a", "a", "b"], 0.25, seed=0)
