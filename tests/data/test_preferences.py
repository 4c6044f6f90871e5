"""Preference pairs: JSONL/CSV reading, Audio-Alpaca names, bad pairs named by line, the resumable audio cache."""

import json
import math

import pytest
import torch

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.audio import write_wav
from rlmusic_pl.data.preferences import PreferenceDataError, PreferencePairs

RATE = 16000


def tone(frequency: float, seconds: float = 0.5) -> torch.Tensor:
    return 0.3 * torch.sin(2 * math.pi * frequency * torch.arange(int(seconds * RATE)) / RATE)


@pytest.fixture
def clips(tmp_path):
    for index, frequency in enumerate((220, 440, 880, 1760)):
        write_wav(tmp_path / "clips" / f"c{index}.wav", tone(frequency), RATE)
    return tmp_path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_pairs_are_read_with_paths_relative_to_the_file_and_attributes(clips):
    path = write_jsonl(clips / "pairs.jsonl", [
        {"prompt": "a piano", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav", "mood": "calm", "score": 0.5},
        {"prompt": "a flute", "chosen": "clips/c2.wav", "rejected": "clips/c3.wav", "tie": True, "negative_prompt": "noise"},
    ])
    pairs = PreferencePairs(str(path), duration_s=0.25)
    items = pairs.items()
    assert [item["prompt"] for item in items] == ["a piano", "a flute"]
    assert items[0]["attributes"] == {"mood": "calm", "score": "0.5"}
    assert items[0]["chosen"] == str((clips / "clips/c0.wav").resolve())
    assert [item["tie"] for item in items] == [False, True]
    assert items[1]["negative_prompt"] == "noise"
    audio = pairs.audio(items[0]["chosen"])
    assert audio.shape == (4000,)
    torch.testing.assert_close(audio, tone(220)[:4000], atol=1e-4, rtol=0)  # 16-bit WAV rounding


def test_csv_with_audio_alpaca_names_and_a_padded_clip(clips):
    path = clips / "alpaca.csv"
    path.write_text("captions,chosen,reject,strategy,tie\n"
                    "a dog barks,clips/c0.wav,clips/c1.wav,inference,0\n"
                    "rain,clips/c2.wav,clips/c3.wav,inference,yes\n")
    pairs = PreferencePairs(str(path), duration_s=1.0)
    items = pairs.items()
    assert [(item["prompt"], item["attributes"], item["tie"]) for item in items] == [
        ("a dog barks", {"strategy": "inference"}, False), ("rain", {"strategy": "inference"}, True)]
    audio = pairs.audio(items[1]["rejected"])
    assert audio.shape == (16000,) and audio[8000:].abs().max() == 0  # 0.5 s clip padded with silence
    # An audio cell exported by `datasets` is a mapping with a path.
    path = write_jsonl(clips / "cells.jsonl", [{"prompt": "x", "chosen": {"path": "clips/c0.wav", "bytes": None},
                                                "rejected": {"path": "clips/c1.wav"}}])
    assert len(PreferencePairs(str(path)).items()) == 1


@pytest.mark.parametrize("record, message", [
    ({"prompt": "  ", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav"}, "empty 'prompt'"),
    ({"prompt": "a", "chosen": "clips/missing.wav", "rejected": "clips/c1.wav"}, "chosen file 'clips/missing.wav' not found"),
    ({"prompt": "a", "chosen": "clips/c0.wav"}, "missing or empty 'rejected'"),
    ({"prompt": "a", "chosen": "clips/c0.wav", "rejected": "./clips/../clips/c0.wav"}, "same file"),
    ({"prompt": "a", "chosen": "clips/c0.wav", "rejected": "clips/bad.wav"}, "not a readable audio file"),
    ({"prompt": "a", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav", "tie": "maybe"}, "'tie' must be"),
])
def test_each_bad_pair_is_named_by_line_and_skipped_or_fatal(clips, record, message, recwarn):
    (clips / "clips" / "bad.wav").write_bytes(b"not audio at all")
    good = {"prompt": "fine", "chosen": "clips/c2.wav", "rejected": "clips/c3.wav"}
    path = write_jsonl(clips / "pairs.jsonl", [good, record])
    items = PreferencePairs(str(path), cache_dir=str(clips / "cache")).items()
    assert [item["prompt"] for item in items] == ["fine"]
    warned = [str(w.message) for w in recwarn if "skipped bad preference pair" in str(w.message)]
    assert len(warned) == 1 and f"pairs.jsonl:2: " in warned[0] and message in warned[0]
    with pytest.raises(PreferenceDataError, match=rf"pairs.jsonl:2: .*{message}"):
        PreferencePairs(str(path), cache_dir=str(clips / "cache"), bad_pairs="error").items()


def test_a_file_with_no_usable_pair_is_an_error(clips):
    path = write_jsonl(clips / "pairs.jsonl", [{"prompt": "a", "chosen": "clips/c0.wav", "rejected": "clips/c0.wav"}])
    with pytest.raises(PreferenceDataError, match=r"no usable preference pair \(1 read, 1 bad\)"), pytest.warns(UserWarning):
        PreferencePairs(str(path)).items()
    with pytest.raises(PreferenceDataError, match="unsupported preference file type '.txt'"):
        PreferencePairs(str(write_jsonl(clips / "p.txt", []))).items()
    with pytest.raises(PreferenceDataError, match="preference file not found"):
        PreferencePairs(str(clips / "nothing.jsonl")).items()


def test_the_run_reports_how_many_pairs_were_kept(clips, caplog):
    path = write_jsonl(clips / "pairs.jsonl", [
        {"prompt": "a", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav"},
        {"prompt": "", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav"},
    ])
    with caplog.at_level("INFO"), pytest.warns(UserWarning):
        PreferencePairs(str(path)).items()
    assert "kept 1 of 2 (1 skipped)" in caplog.text


def test_audio_is_read_once_and_the_cache_resumes(clips, monkeypatch):
    path = write_jsonl(clips / "pairs.jsonl", [
        {"prompt": "a", "chosen": "clips/c0.wav", "rejected": "clips/c1.wav"},
        {"prompt": "b", "chosen": "clips/c1.wav", "rejected": "clips/c2.wav"},
    ])
    import rlmusic_pl.data.preferences as preferences

    reads = []
    original = preferences.load_audio
    monkeypatch.setattr(preferences, "load_audio", lambda file, rate: reads.append(file) or original(file, rate))
    first = PreferencePairs(str(path), duration_s=0.5)
    first.items()
    assert sorted(reads) == sorted(str((clips / f"clips/c{i}.wav").resolve()) for i in range(3))  # c1 read once
    assert (clips / "pairs.jsonl.cache" / "16000hz" / "manifest.jsonl").is_file()
    reads.clear()
    again = PreferencePairs(str(path), duration_s=0.5)
    torch.testing.assert_close(again.audio(again.items()[0]["chosen"]), first.audio(first.items()[0]["chosen"]))
    assert reads == []  # every clip came from the cache
    write_wav(clips / "clips" / "c2.wav", tone(300, 0.6), RATE)  # changed since cached: read again
    PreferencePairs(str(path), duration_s=0.5).items()
    assert reads == [str((clips / "clips/c2.wav").resolve())]


def test_the_data_module_splits_pairs_and_batches_their_audio(clips):
    path = write_jsonl(clips / "pairs.jsonl", [
        {"prompt": f"p{i}", "chosen": f"clips/c{i % 4}.wav", "rejected": f"clips/c{(i + 1) % 4}.wav", "tie": i == 3}
        for i in range(8)
    ])
    data = PromptAttributeDataModule(preferences=PreferencePairs(str(path), duration_s=0.25), val_fraction=0.25,
                                     batch_size=3, negative_prompt="bad")
    assert len(data.split("train")) == 6 and len(data.split("val")) == 2
    batch = next(iter(data.train_dataloader()))
    assert batch["chosen_audio"].shape == batch["rejected_audio"].shape == (3, 4000)
    assert batch["tie"].dtype == torch.bool and batch["tie"].shape == (3,)
    assert batch["negative_prompt"] == ["bad"] * 3 and len(batch["prompt"]) == 3
    with pytest.raises(Exception, match="give no other prompt source"):
        PromptAttributeDataModule(prompts=["x"], preferences=PreferencePairs(str(path))).setup()
