"""``python -m rlmusic_pl``: help of every subcommand, documented module arguments, tiny end-to-end fits, resuming,
bad input reported in one line, and failed runs that leave no run directory."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlmusic_pl.backbone.audioldm2 import BackboneLoadError
from rlmusic_pl.cli import main
from rlmusic_pl.lora import LORA_WEIGHTS, read_adapter_info
from rlmusic_pl.modules import AudioLDM2Module, DDPOModule

ROOT = Path(__file__).resolve().parents[1]
TINY_DDPO = str(ROOT / "configs" / "tiny" / "ddpo_centroid.yaml")
TINY_SLIDER = str(ROOT / "configs" / "tiny" / "slider_stage1.yaml")
TINY_SWEEP = str(ROOT / "configs" / "tiny" / "sweep.yaml")
FAST = [
    "--trainer.max_steps=1", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
    "--model.num_steps=2", "--model.duration_s=1.0", "--data.batch_size=1", "--model.samples_per_prompt=2",
    "--model.sample_batch_size=2", "--model.train_batch_size=2", "--model.stat_min_count=1", "--model.advantage=batch",
]


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    # LightningCLI warns when pytest's own arguments sit next to the args given to it.
    monkeypatch.setattr(sys, "argv", ["rlmusic_pl"])


def run_cli(args: list[str], capsys) -> str:
    """Run the CLI in-process; return what it printed. Help exits with status 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(args=args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_module_entry_point_help_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "rlmusic_pl", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict", "prepare --help", "synthesize --help"):
        assert subcommand in result.stdout.replace("\n", " ")


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_subcommand_help_exits_cleanly(subcommand, capsys):
    out = run_cli([subcommand, "--help"], capsys)
    assert "--model" in out and "--data" in out and "--trainer" in out


def documented_argument_names() -> list[str]:
    names = []
    for cls in (DDPOModule, AudioLDM2Module):
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                names.append(name)
    return names


def undocumented_options(help_text: str, prefix: str) -> dict[str, str]:
    """Options whose help entry has no description before jsonargparse's ``(type: ...)`` note."""
    undocumented = {}
    for entry in re.split(rf"\n\s+(?={re.escape(prefix)})", help_text):
        words = entry.split()
        if not words or not words[0].startswith(prefix) or "(type:" not in entry and "(required, type:" not in entry:
            continue
        before_type = " ".join(words).split("(type:")[0].split("(required, type:")[0].split()
        # Drop the synopsis: the option names and their metavars (UPPER_CASE, {choices}, [ITEM,...]).
        description = [w for w in before_type if not (w.startswith(prefix) or re.fullmatch(r"[A-Z_]+,?|\{.*\}|\[.*\]", w))]
        if not description:
            undocumented[words[0]] = entry
    return undocumented


def test_every_ddpo_argument_is_documented_in_the_help(capsys):
    out = run_cli(["fit", "--config", TINY_DDPO, "--model.help", "rlmusic_pl.modules.DDPOModule"], capsys)
    names = documented_argument_names()
    assert {"reward", "num_steps", "lora_rank", "backbone", "export_to"} <= set(names)
    for name in names:
        assert re.search(rf"--model\.{name}\b", out), f"--model.{name} missing from the help"
    assert undocumented_options(out, "--model.") == {}


def test_the_documentation_check_can_fail():
    help_text = "  --model.eta ETA       (type: float, default: 1.0)\n  --model.seed SEED     the seed. (type: int, default: 0)\n"
    assert list(undocumented_options(help_text, "--model.")) == ["--model.eta"]


# ------------------------------------------------------------------------------ end to end
def adapter_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(LORA_WEIGHTS) if p.parent.name == "adapter")


def lora_rank_in_file(adapter: Path) -> int:
    state = load_file(str(adapter / LORA_WEIGHTS))
    return next(v.shape[0] for k, v in state.items() if ".lora_A." in k)


@pytest.mark.slow
def test_fit_twice_into_one_run_directory_exports_adapters_and_applies_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the config land in the test's directory
    root = tmp_path / "runs"
    base = ["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={root}", *FAST]

    main(args=base)
    first = adapter_dirs(root)
    assert len(first) == 1, list(root.rglob("*"))
    assert (first[0].parent / "config.yaml").is_file()
    assert read_adapter_info(first[0])["settings"]["rank"] == 4

    main(args=[*base, "--model.lora_rank=8", "--model.lora_targets=self_attention"])
    second = [d for d in adapter_dirs(root) if d not in first]
    assert len(second) == 1
    info = read_adapter_info(second[0])
    assert info["settings"]["rank"] == 8 and info["settings"]["targets"] == "self_attention"
    assert info["kind"] == "DDPOModule" and info["backbone"] == "tiny"
    assert lora_rank_in_file(second[0]) == 8
    assert not any(".attn2." in k for k in load_file(str(second[0] / LORA_WEIGHTS)))
    assert lora_rank_in_file(first[0]) == 4, "the second run must not overwrite the first run's adapter"


@pytest.mark.slow
def test_fit_twice_without_a_logger_overwrites_the_saved_config_and_exports_to(tmp_path, monkeypatch):
    # Without a logger the run directory is default_root_dir itself: the second run meets the first's config.yaml.
    monkeypatch.chdir(tmp_path)
    root, export = tmp_path / "runs", tmp_path / "checkpoints" / "ddpo_tiny"
    base = ["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={root}", "--trainer.logger=false", *FAST, f"--model.export_to={export}"]
    main(args=base)
    main(args=[*base, "--model.lora_rank=8"])

    assert (root / "config.yaml").is_file() and "lora_rank: 8" in (root / "config.yaml").read_text()
    assert adapter_dirs(root) == [root / "adapter"]
    assert lora_rank_in_file(root / "adapter") == 8
    original, copied = load_file(str(root / "adapter" / LORA_WEIGHTS)), load_file(str(export / LORA_WEIGHTS))
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    assert read_adapter_info(export)["settings"]["rank"] == 8


# ------------------------------------------------------------------------------ resuming
ONE_STEP = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
            "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def slider_run(tmp_path_factory):
    """A one-step Stage-1 fit of the tiny config: its checkpoint (LightningCLI records the class in it) and export_to."""
    root = tmp_path_factory.mktemp("slider")
    export = root / "exported"
    main(args=["fit", "--config", TINY_SLIDER, f"--trainer.default_root_dir={root / 'runs'}", *ONE_STEP,
               f"--model.export_to={export}", f"--data.contrast.directory={root / 'synthetic'}"])
    (checkpoint,) = (root / "runs").rglob("*.ckpt")
    return checkpoint, export


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.slow
def test_resuming_from_the_checkpoint_of_another_module_stops_before_anything_is_written(slider_run, tmp_path, capsys):
    checkpoint, slider_export = slider_run
    exported = snapshot(slider_export)
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={tmp_path / 'runs'}", *ONE_STEP,
                   f"--ckpt_path={checkpoint}"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: checkpoint {checkpoint} was saved by SliderModule"), last_line
    assert "the model to resume is DDPOModule" in last_line
    assert not (tmp_path / "runs").exists()
    assert snapshot(slider_export) == exported, "the slider's exported adapter must stay as it was"


@pytest.mark.slow
def test_resuming_keeps_command_line_overrides_and_warns_about_config_values_the_checkpoint_replaces(tmp_path):
    root = tmp_path / "runs"
    main(args=["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={root}", *FAST])  # num_steps=2 on the command line
    (checkpoint,) = root.rglob("*.ckpt")
    without_num_steps = [arg for arg in FAST if not arg.startswith("--model.num_steps")]  # the config file says 6
    with pytest.warns(UserWarning, match="its hyperparameters replace the config's num_steps=6 -> 2 "):
        main(args=["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={root}", *without_num_steps,
                   "--trainer.max_steps=2", "--trainer.max_epochs=2", "--model.learning_rate=0.5",
                   "--model.init_args.clip_range", "0.3", f"--ckpt_path={checkpoint}"])
    (resumed,) = (root / "lightning_logs" / "version_1").rglob("*.ckpt")
    saved = torch.load(resumed, weights_only=False)
    assert saved["global_step"] == 2
    assert saved["hyper_parameters"]["learning_rate"] == 0.5 and saved["hyper_parameters"]["clip_range"] == 0.3
    assert saved["hyper_parameters"]["num_steps"] == 2
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5


# ------------------------------------------------------------------------------ bad input
def truncated_adapter(directory: Path) -> Path:
    directory.mkdir()
    (directory / LORA_WEIGHTS).write_bytes(b"\x10" * 100)
    return directory / LORA_WEIGHTS


@pytest.mark.parametrize("args, message", [
    (["predict", "--config", TINY_SWEEP, "--model.adapter={adapter}"],
     "error: {adapter}: not a readable safetensors LoRA file ("),
    (["fit", "--config", TINY_DDPO, "--model.num_steps=0"], "error: num_steps must be > 0, got 0"),
    (["fit", "--config", TINY_DDPO, "--data.val_fraction=2"], "error: val_fraction must be in [0, 1), got 2.0"),
])
def test_an_error_raised_while_building_the_classes_is_the_last_line_without_a_config_dump(args, message, tmp_path, capsys):
    adapter = truncated_adapter(tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main(args=[arg.format(adapter=adapter) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(message.format(adapter=adapter)), err[-2000:]
    assert "Namespace(" not in err and "Union" not in err


# ------------------------------------------------------------------------------ failed runs
def test_a_run_that_fails_before_training_leaves_no_run_directory(tmp_path):
    earlier_run = tmp_path / "runs" / "lightning_logs" / "version_0"
    earlier_run.mkdir(parents=True)
    (earlier_run / "config.yaml").write_text("an earlier run's")
    missing_backbone = f"--model.backbone={tmp_path / 'no_such_backbone'}"
    for root in (tmp_path / "runs", tmp_path / "new" / "runs"):
        with pytest.raises(BackboneLoadError):
            main(args=["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={root}", *FAST, missing_backbone])
    assert [p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()] == ["version_0"]
    assert (earlier_run / "config.yaml").read_text() == "an earlier run's"
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_during_training_keeps_its_run_directory(tmp_path, monkeypatch):
    def fail(self, batch, batch_idx):
        raise RuntimeError("the first step failed")

    monkeypatch.setattr(DDPOModule, "training_step", fail)
    with pytest.raises(RuntimeError, match="the first step failed"):
        main(args=["fit", "--config", TINY_DDPO, f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
