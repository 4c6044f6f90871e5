"""The listening page of a sweep: ``index.html``, a grid of players with a row per prompt and seed.

The page is built from the sweep's table rows alone, so every kind of sweep (adapter strengths,
steering coefficients, ...) renders from the same code: the players of a row are ordered by the
numeric ``axis`` column of the table, shown under ``axis_label``. It is self-contained: inline CSS
and one small inline script, no network, and only relative links to the files beside it, so the
folder can be zipped and shared. Every text from the table or the settings is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import numpy
import torch
from matplotlib.image import imsave
from torch import Tensor

PAGE = "index.html"
THUMBNAIL_DIR = "mels"
THUMBNAIL_COLUMNS = 256  # longer mels are averaged down to this many frames

# "Play the row in order": the row's players one after another; playing any player by hand ends it.
SCRIPT = """
var queue = [], current = null;
function playNext() {
  current = queue.shift() || null;
  if (current) { current.currentTime = 0; current.play(); }
}
document.addEventListener("ended", function (event) { if (event.target === current) playNext(); }, true);
document.addEventListener("play", function (event) { if (event.target !== current) { queue = []; current = null; } }, true);
document.querySelectorAll("button.play-row").forEach(function (button) {
  button.addEventListener("click", function () {
    document.querySelectorAll("audio").forEach(function (player) { player.pause(); });
    queue = Array.from(button.closest("tr").querySelectorAll("audio"));
    playNext();
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table.settings td, table.settings th { text-align: left; padding: 0.1em 0.8em 0.1em 0; font-size: 0.9em; }
table.settings td { font-family: ui-monospace, monospace; word-break: break-all; }
.plots { display: flex; flex-wrap: wrap; gap: 0.5em; }
.plots img { width: 420px; border: 1px solid #ddd; }
table.grid { border-collapse: collapse; }
table.grid > * > tr > th, table.grid > * > tr > td { border: 1px solid #ddd; padding: 0.4em; vertical-align: top; }
table.grid > thead th { background: #f4f4f4; }
table.grid > tbody > tr > th { text-align: left; font-weight: normal; max-width: 18em; }
.prompt { font-weight: 600; margin: 0 0 0.3em; white-space: pre-wrap; overflow-wrap: anywhere; }
.meta { color: #555; font-size: 0.85em; margin: 0.2em 0; overflow-wrap: anywhere; }
td.clip img.mel { display: block; width: 200px; height: 64px; }
td.clip audio { width: 200px; display: block; margin: 0.3em 0; }
table.metrics { font-size: 0.8em; color: #333; border-collapse: collapse; }
table.metrics th { text-align: left; font-weight: normal; padding: 0 0.6em 0 0; }
table.metrics td { padding: 0; font-variant-numeric: tabular-nums; }
"""


def thumbnail_file(clip_file: str) -> str:
    """The page's mel thumbnail of the clip at ``clip_file`` (both relative to the sweep folder)."""
    stem = clip_file.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{THUMBNAIL_DIR}/{stem}.png"


def thumbnail_png(image: Tensor) -> bytes:
    """A mel image [n_mels, frames] in [0, 1] as a small PNG, frames averaged down to ``THUMBNAIL_COLUMNS``."""
    if image.shape[1] > THUMBNAIL_COLUMNS:
        image = torch.nn.functional.adaptive_avg_pool1d(image[None], THUMBNAIL_COLUMNS)[0]
    buffer = io.BytesIO()
    pixels = image.numpy().astype(numpy.float32)
    imsave(buffer, pixels, cmap="magma", vmin=0.0, vmax=1.0, format="png", metadata={"Software": None})
    return buffer.getvalue()


def sweep_page(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    settings: Mapping[str, Any],
    plots: Mapping[str, str],
    links: Sequence[str] = (),
    axis: str = "strength",
    axis_label: str | None = None,
) -> str:
    """The HTML of a sweep's listening page.

    Args:
        rows: the sweep table's rows (``prompt_index``, ``prompt``, ``negative_prompt``, ``seed``,
            ``file``, ``attribute.<key>``..., the ``axis`` column and the metrics).
        metrics: the metric columns shown under each player.
        settings: the generation settings shown in the header.
        plots: metric name -> relative path of its plot, shown on top.
        links: relative paths of other files of the sweep, linked in the header.
        axis: the numeric column that orders the players of a row.
        axis_label: the name shown for that column (default: ``axis``).
    """
    label = axis_label or axis
    values = sorted({float(row[axis]) for row in rows})
    rows_of_players = len({(row["prompt_index"], row["seed"]) for row in rows})
    script = SCRIPT.strip()
    policy = f"script-src '{script_hash(script)}'; object-src 'none'; base-uri 'none'"  # only the page's own script runs
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>Sweep: {len(rows)} clips, {rows_of_players} rows</title>",
        f"<style>{STYLE.strip()}</style></head><body>",
        f"<h1>Sweep: {len(rows)} clips, {rows_of_players} rows of {len(values)} {escape(label)} values</h1>",
        settings_table(settings),
    ]
    if links:
        anchors = (f'<a href="{url(link)}">{escape(link)}</a>' for link in links)
        parts.append('<p class="links">Files: ' + " · ".join(anchors) + "</p>")
    if plots:
        parts.append(f"<h2>Metrics against {escape(label)}</h2><div class=\"plots\">")
        parts += [f'<a href="{url(path)}"><img src="{url(path)}" alt="{escape(metric)} against {escape(label)}"></a>'
                  for metric, path in plots.items()]
        parts.append("</div>")
    parts += ["<h2>Clips</h2>", clip_grid(rows, values, metrics, axis, label), f"<script>{script}</script></body></html>\n"]
    return "\n".join(parts)


def clip_grid(rows: Sequence[Mapping[str, Any]], values: list[float], metrics: Sequence[str], axis: str, label: str) -> str:
    """A table row of players per prompt and seed, a column per ``axis`` value (empty where a clip is missing)."""
    grid: dict[tuple[int, int], dict[float, Mapping[str, Any]]] = {}
    for row in sorted(rows, key=lambda row: (row["prompt_index"], row["seed"])):
        grid.setdefault((row["prompt_index"], row["seed"]), {})[float(row[axis])] = row
    header = "".join(f"<th>{escape(label)} {value:+g}</th>" for value in values)
    parts = [f'<table class="grid"><thead><tr><th>prompt, seed</th>{header}</tr></thead><tbody>']
    for (prompt_index, seed), by_value in grid.items():
        first = next(iter(by_value.values()))
        parts.append(f'<tr class="clip-row" data-prompt-index="{escape(prompt_index)}" data-seed="{escape(seed)}">{row_header(first)}')
        parts += [clip_cell(by_value[value], metrics, axis, label) if value in by_value else "<td></td>" for value in values]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def settings_table(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    cells = "".join(f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>" for key, value in settings.items())
    return f'<h2>Generation settings</h2><table class="settings">{cells}</table>'


def row_header(row: Mapping[str, Any]) -> str:
    attributes = [f"{key.removeprefix('attribute.')}: {value}" for key, value in row.items()
                  if key.startswith("attribute.") and value is not None]
    meta = [f"seed {row['seed']}", *attributes]
    if row.get("negative_prompt"):
        meta.append(f"negative: {row['negative_prompt']}")
    lines = "".join(f'<p class="meta">{escape(line)}</p>' for line in meta)
    return (f'<th scope="row"><p class="prompt">{escape(row["prompt"])}</p>{lines}'
            '<button type="button" class="play-row">&#9654; play the row in order</button></th>')


def clip_cell(row: Mapping[str, Any], metrics: Sequence[str], axis: str, label: str) -> str:
    value = float(row[axis])
    scores = "".join(f"<tr><th>{escape(name)}</th><td>{format_metric(row.get(name))}</td></tr>" for name in metrics)
    return (f'<td class="clip" data-axis-value="{value!r}">'
            f'<img class="mel" src="{url(thumbnail_file(row["file"]))}" alt="log-mel at {escape(label)} {value:+g}">'
            f'<audio controls preload="metadata" src="{url(row["file"])}"></audio>'
            f'<table class="metrics">{scores}</table></td>')


def format_metric(value: Any) -> str:
    return "–" if value is None else escape(f"{value:.4g}" if isinstance(value, float) else value)


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def url(relative_path: str) -> str:
    """A relative path as an escaped URL (``+``, spaces and ``#`` in file names stay part of the name)."""
    return escape(quote(relative_path, safe="/"))


def script_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
