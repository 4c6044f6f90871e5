"""Every shipped config parses through the CLI (types, class paths, argument names), without building models."""

from pathlib import Path

import pytest

from rlmusic_pl.cli import main

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def subcommand(config: Path) -> str:
    return "predict" if "sweep" in config.name else "fit"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name == "tiny" else p.parent)))
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rlmusic_pl"])
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand(config), "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path: rlmusic_pl.modules." in printed


def test_every_job_has_a_tiny_config():
    names = {p.name for p in CONFIGS if p.parent.name == "configs"}
    tiny = {p.name for p in CONFIGS if p.parent.name == "tiny"}
    assert names - tiny == {"ddpo_emopia.yaml"}  # the emotion job runs tiny as ddpo_clap's monitor
