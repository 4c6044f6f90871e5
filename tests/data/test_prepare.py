"""prepare: audio folder -> log-mel features + manifest; bad files reported by name; resumable; CLI."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from rlmusic_pl.data import prepare
from rlmusic_pl.data.prepare import MANIFEST, DataFolderError, build_parser, main, prepare_folder, read_manifest


def tone(seconds, sample_rate, channels=1):
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * time)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    source = tmp_path / "audio"
    (source / "sub").mkdir(parents=True)
    soundfile.write(source / "good.wav", tone(0.5, 16000), 16000)
    soundfile.write(source / "sub" / "stereo.flac", tone(0.5, 44100, channels=2), 44100)  # other rate, 2 channels
    soundfile.write(source / "silent.wav", np.zeros((8000, 1), np.float32), 16000)
    soundfile.write(source / "short.wav", tone(0.01, 16000), 16000)  # 160 samples: less than one frame
    (source / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    (source / "notes.txt").write_text("not audio")
    (source / ".hidden.wav").write_bytes(b"ignored")
    return source


def test_good_files_are_prepared_and_each_bad_file_is_reported_by_name(folder, tmp_path):
    out = tmp_path / "features"
    report = prepare_folder(folder, out, progress=False)
    assert sorted(report.prepared) == ["good.wav", "sub/stereo.flac"]
    assert set(report.failed) == {"silent.wav", "short.wav", "corrupt.wav", "notes.txt"}
    assert "silent" in report.failed["silent.wav"]
    assert "too short" in report.failed["short.wav"] and "one 1024-sample frame" in report.failed["short.wav"]
    assert "not a readable audio file" in report.failed["corrupt.wav"]
    assert "not a readable audio file" in report.failed["notes.txt"]
    entries = {entry["source"]: entry for entry in read_manifest(out)}
    assert set(entries) == {"good.wav", "sub/stereo.flac"}
    for entry in entries.values():
        mel = np.load(out / entry["features"])
        assert mel.shape == (entry["frames"], 64) and mel.dtype == np.float32
        assert entry["frames"] == 50  # 0.5 s at 100 frames/s, whatever the file's rate and channels


def test_a_second_run_skips_done_files_and_redoes_changed_ones(folder, tmp_path):
    out = tmp_path / "features"
    prepare_folder(folder, out, progress=False)
    again = prepare_folder(folder, out, progress=False)
    assert again.prepared == [] and sorted(again.skipped) == ["good.wav", "sub/stereo.flac"]
    soundfile.write(folder / "good.wav", tone(1.0, 16000), 16000)
    changed = prepare_folder(folder, out, progress=False)
    assert changed.prepared == ["good.wav"]
    assert {e["source"]: e["frames"] for e in read_manifest(out)}["good.wav"] == 100


def test_min_duration_and_silence_threshold_are_respected(folder, tmp_path):
    report = prepare_folder(folder, tmp_path / "out", min_duration_s=0.6, silence_db=-200.0, progress=False)
    assert "below the minimum duration of 0.6 s" in report.failed["good.wav"]
    assert "silent.wav" in report.failed  # digital silence has no finite level


def test_main_reports_failures_on_stderr_and_returns_1(folder, tmp_path, capsys):
    assert main([str(folder), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    for name in ("silent.wav", "short.wav", "corrupt.wav", "notes.txt"):
        assert name in err
    assert "prepared 2, already done 0, failed 4" in err
    assert (tmp_path / "out" / MANIFEST).is_file()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_folder_is_a_clear_error(tmp_path, capsys, make):
    source = tmp_path / "audio"
    if make == "empty":
        source.mkdir()
    with pytest.raises(DataFolderError, match="no such folder" if make == "missing" else "holds no files"):
        prepare_folder(source, tmp_path / "out", progress=False)
    assert main([str(source), str(tmp_path / "out")]) == 2
    assert str(source) in capsys.readouterr().err


def test_every_flag_has_help_and_the_cli_dispatches_prepare(tmp_path):
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
    result = subprocess.run([sys.executable, "-m", "rlmusic_pl", "prepare", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--min-duration", "--silence-db", "--overwrite", "--no-progress", "source", "out"):
        assert flag in result.stdout


def test_bad_manifest_line_is_named(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"source": "a.wav", "features": "features/a.wav.npy"}) + "\n{oops\n")
    with pytest.raises(DataFolderError, match=rf"{MANIFEST}:2: invalid JSON"):
        read_manifest(tmp_path)


def good_folder(tmp_path, count: int = 4):
    source = tmp_path / "audio"
    source.mkdir()
    for index in range(count):
        soundfile.write(source / f"{index}.wav", tone(0.2, 16000), 16000)
    return source


def test_ctrl_c_prints_one_line_with_the_count_done_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    source, out = good_folder(tmp_path), tmp_path / "out"
    real, calls = prepare.prepare_file, []

    def interrupted_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prepare, "prepare_file", interrupted_at_the_third)
    try:
        status = main([str(source), str(out), "--no-progress"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C reached the user as a KeyboardInterrupt traceback")
    assert status == 130
    assert capsys.readouterr().err.splitlines() == [
        f"interrupted: 2 of 4 files are prepared and listed in {out / MANIFEST}; run the same command again to prepare the rest"
    ]
    monkeypatch.setattr(prepare, "prepare_file", real)
    report = prepare_folder(source, out, progress=False)
    assert report.skipped == ["0.wav", "1.wav"] and report.prepared == ["2.wav", "3.wav"]


KILLED_AT_THE_THIRD_FILE = """
import os, signal, sys
from rlmusic_pl.data import prepare
prepare.MANIFEST_INTERVAL_S = 0.0
real, done = prepare.prepare_file, []
def killed_at_the_third(*args):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(real(*args))
    return done[-1]
prepare.prepare_file = killed_at_the_third
prepare.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_run_leaves_a_manifest_of_the_files_done_and_a_rerun_skips_them(tmp_path):
    source, out = good_folder(tmp_path), tmp_path / "out"
    command = [sys.executable, "-c", KILLED_AT_THE_THIRD_FILE, str(source), str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert [entry["source"] for entry in read_manifest(out)] == ["0.wav", "1.wav"]
    report = prepare_folder(source, out, progress=False)
    assert report.skipped == ["0.wav", "1.wav"] and report.prepared == ["2.wav", "3.wav"]
