"""The sweep's listening page: players per prompt and seed in axis order, escaped text, relative links, thumbnails."""

import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import torch
from test_prediction_writer import STRENGTHS, prediction, run

from rlmusic_pl.callbacks import SweepWriter
from rlmusic_pl.callbacks.sweep_page import sweep_page, thumbnail_png

EVIL = "a \"quoted\" 'tender' piano <script>alert(1)</script> & <b>more</b>"


class PageParser(HTMLParser):
    """The audio sources of each clip row, every src/href, and the text of the prompts."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self.prompts: list[str] = []
        self.scripts = 0
        self._in_prompt = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and attrs.get("class") == "clip-row":
            self.rows.append([])
        if tag == "audio":
            self.rows[-1].append(attrs["src"])
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        self.scripts += tag == "script"
        self._in_prompt = tag == "p" and attrs.get("class") == "prompt"

    def handle_data(self, data):
        if self._in_prompt:
            self.prompts.append(data)

    def handle_endtag(self, tag):
        self._in_prompt = False


def rows(prompts=("a piano", EVIL), values=(0.5, -1.0, 0.0), column="strength") -> list[dict]:
    """Table rows in scrambled order (the page must order them itself)."""
    made = [{"prompt_index": p, "prompt": prompt, "negative_prompt": "noise", "seed": seed, column: value,
             "file": f"audio/p{p}_{column}{value:+g}_seed{seed}.wav", "attribute.emotion": "sad", "score": value * 2}
            for p, prompt in enumerate(prompts) for value in values for seed in (1, 0)]
    return made[::-1]


def test_players_are_ordered_by_the_axis_per_prompt_and_seed():
    page = PageParser(sweep_page(rows(), ["score"], {}, {}))
    in_order = ("-1", "%2B0", "%2B0.5")  # "+" quoted
    assert page.rows == [[f"audio/p{p}_strength{v}_seed{s}.wav" for v in in_order] for p in (0, 1) for s in (0, 1)]


def test_another_axis_column_and_label_order_and_name_the_players():
    table = rows(column="coefficient", values=(2.0, -4.0))
    html = sweep_page(table, ["score"], {}, {}, axis="coefficient", axis_label="steering coefficient")
    page = PageParser(html)
    assert page.rows[0] == ["audio/p0_coefficient-4_seed0.wav", "audio/p0_coefficient%2B2_seed0.wav"]
    assert "steering coefficient -4" in html and "strength" not in html


def test_prompts_and_settings_render_as_text_and_only_the_page_script_exists():
    html = sweep_page(rows(), ["score<i>"], {"backbone": "<img src=x onerror=alert(1)>"}, {"score<i>": "plots/score_i_.png"})
    page = PageParser(html)
    assert EVIL in page.prompts
    assert page.scripts == 1 and "<script>alert" not in html and "<img src=x" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "score&lt;i&gt;" in html


def test_links_are_relative_and_a_missing_clip_leaves_an_empty_cell():
    table = [row for row in rows() if not (row["prompt_index"] == 1 and row["seed"] == 0 and row["strength"] == 0.0)]
    html = sweep_page(table, ["score"], {"steps": 4}, {"score": "plots/score.png"}, links=["table.csv"])
    page = PageParser(html)
    assert [len(row) for row in page.rows] == [3, 3, 2, 3]
    assert html.count("<td></td>") == 1
    external = [link for link in page.links if ":" in link.split("/", 1)[0] or link.startswith("/")]
    assert external == ["data:,"]  # the empty favicon: no request at all
    assert {"table.csv", "plots/score.png", "mels/p0_strength-1_seed0.png"} <= set(page.links)


def test_thumbnails_are_small_pngs():
    png = thumbnail_png(torch.rand(64, 1000))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    assert width == 256 and thumbnail_png(torch.rand(64, 1000)) != png


@pytest.fixture
def module(tmp_path):
    return SimpleNamespace(sweep_dir=tmp_path / "sweep", strengths=list(STRENGTHS), seeds=[0, 1], adapter_path=Path("adapters/x"),
                           adapter_kind="SliderModule")


def test_the_writer_writes_the_page_with_settings_and_a_thumbnail_per_clip(module):
    module.sweep_dir.mkdir()
    (module.sweep_dir / "sweep_settings.json").write_text(json.dumps({"num_steps": 4, "axis_label": "coefficient"}))
    run(SweepWriter(progress=False), module, [(prediction(EVIL, 0, {"emotion": "sad"}), [0])])
    out = module.sweep_dir
    table = json.loads((out / "table.json").read_text())
    page = PageParser((out / "index.html").read_text())
    assert sum(map(len, page.rows)) == len(table) == len(list((out / "mels").glob("*.png")))
    assert all((out / unquote(link)).is_file() for link in page.links if link != "data:,")
    html = (out / "index.html").read_text()
    assert "coefficient -1" in html and ">SliderModule<" in html and ">4<" in html


def test_a_regenerated_clip_gets_a_new_thumbnail_and_the_others_are_kept(module):
    run(SweepWriter(progress=False), module, [(prediction("a piano", 0, {}), [0])])
    out = module.sweep_dir
    before = {p.name: p.stat().st_mtime_ns for p in (out / "mels").iterdir()}
    pred = prediction("a piano", 0, {}, generated=False)
    name = pred.clips[0].file_name
    pred.new_audio = {name: 0.5 * torch.sin(torch.arange(16000 // 4) * 0.3)}  # a different clip under the same name
    run(SweepWriter(progress=False), module, [(pred, [0])])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "mels").iterdir()}
    assert {key for key in after if after[key] != before[key]} == {name.replace(".wav", ".png")}


def test_page_false_writes_no_page(module):
    run(SweepWriter(progress=False, page=False), module, [(prediction("a piano", 0, {}), [0])])
    assert not (module.sweep_dir / "index.html").exists() and not (module.sweep_dir / "mels").exists()


def test_a_resumed_run_with_another_prompt_rewrites_the_page_with_every_clip(module):
    run(SweepWriter(progress=False, plots=False, mel_grid=False), module, [(prediction("a piano", 0, {}), [0])])
    assert sum(map(len, PageParser((module.sweep_dir / "index.html").read_text()).rows)) == 2 * len(STRENGTHS)
    run(SweepWriter(progress=False, plots=False, mel_grid=False), module,
        [(prediction("a piano", 0, {}, generated=False), [0]), (prediction("a harp", 0, {}), [1])])
    page = PageParser((module.sweep_dir / "index.html").read_text())
    assert len(page.rows) == 4 and page.prompts == ["a piano", "a piano", "a harp", "a harp"]
