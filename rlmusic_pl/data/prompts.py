"""Prompt sources: inline entries, template expansion and prompt files (.txt, .jsonl, .csv).

Every function returns items ``{"prompt": str, "attributes": dict[str, str]}``, plus
``"negative_prompt": str`` where the entry overrides the data module's negative prompt.
Bad input raises PromptError naming the file and line, the inline entry, or the template key.
"""

from __future__ import annotations

import csv
import itertools
import string
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmusic_pl.data.audio import read_jsonl
from rlmusic_pl.errors import RLMusicError

PromptItem = dict[str, Any]
_RESERVED_KEYS = ("prompt", "negative_prompt", "attributes")


class PromptError(RLMusicError, ValueError):
    """Raised for a prompt source that cannot be used; the message names the file and line, or the key."""


def parse_entry(entry: Any, where: str) -> PromptItem:
    """Validate one prompt entry and return it as an item.

    An entry is a prompt string, or a mapping with a ``prompt``, an optional ``negative_prompt`` and
    optional ``attributes``; any other key is an attribute too. Attribute values must be strings.
    ``where`` names the entry in error messages (``"prompts[3]"``, ``"prompts.jsonl:7"``).
    """
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, Mapping):
        raise PromptError(f"{where}: expected a prompt string or a mapping with a 'prompt' key, got {entry!r}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{where}: missing or empty 'prompt' (expected a non-empty string), got {entry!r}")
    attributes = entry.get("attributes", {})
    if not isinstance(attributes, Mapping):
        raise PromptError(f"{where}: 'attributes' must be a mapping of name -> string, got {attributes!r}")
    extra = {key: value for key, value in entry.items() if key not in _RESERVED_KEYS}
    clash = sorted(extra.keys() & attributes.keys())
    if clash:
        raise PromptError(f"{where}: attribute {clash[0]!r} is given twice, as a key and inside 'attributes'")
    attributes = {**attributes, **extra}
    for name, value in attributes.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise PromptError(f"{where}: attribute {name!r} must be a string (quote it), got {value!r}")
    item: PromptItem = {"prompt": prompt.strip(), "attributes": attributes}
    if "negative_prompt" in entry:
        if not isinstance(entry["negative_prompt"], str):
            raise PromptError(f"{where}: 'negative_prompt' must be a string, got {entry['negative_prompt']!r}")
        item["negative_prompt"] = entry["negative_prompt"]
    return item


def template_keys(template: str) -> list[str]:
    """The placeholder names of a ``str.format`` template, in order of first appearance."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:  # unbalanced braces
        raise PromptError(f"template {template!r}: {err} (write a literal brace as {{{{ or }}}})") from None
    for field in fields:
        if not field.isidentifier():
            raise PromptError(f"template {template!r}: placeholder {{{field}}} must be a name such as {{emotion}}")
    return list(dict.fromkeys(fields))


def expand_template(template: str, values: Mapping[str, Sequence[str]] | None = None) -> list[PromptItem]:
    """Fill ``template`` with every combination of ``values`` (the first placeholder varies slowest).

    Each item's attributes are the values chosen for it, e.g. ``{"emotion": "sad", "instrument": "piano"}``.
    """
    values = dict(values or {})
    keys = template_keys(template)
    for key in values:
        if key not in keys:
            raise PromptError(f"values for {key!r} given but the template has no {{{key}}}: {template!r}")
    for key in keys:
        options = values.get(key)
        if options is None:
            raise PromptError(f"template key {{{key}}} has no values: give template_values {{{key}: [...]}}")
        if isinstance(options, str) or not all(isinstance(option, str) for option in options):
            raise PromptError(f"template values for {{{key}}} must be a list of strings, got {options!r}")
        if not options:
            raise PromptError(f"template key {{{key}}} has an empty list of values")
    choices = (dict(zip(keys, combination)) for combination in itertools.product(*(values[key] for key in keys)))
    return [{"prompt": template.format(**choice), "attributes": choice} for choice in choices]


def load_prompt_file(path: str | Path) -> list[PromptItem]:
    """Read prompts from a file, chosen by extension.

    ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    ``.jsonl``: one JSON object per line, as accepted by ``parse_entry``; blank lines are skipped.
    ``.csv``: a header with a ``prompt`` column; an optional ``negative_prompt`` column (an empty cell
    keeps the default); every other column is an attribute.
    """
    path = Path(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    if path.suffix.lower() not in readers:
        raise PromptError(f"{path}: unsupported prompt file type {path.suffix!r}, expected one of {', '.join(readers)}")
    try:
        items = list(readers[path.suffix.lower()](path))
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not items:
        raise PromptError(f"{path}: the file holds no prompts")
    return items


def _read_txt(path: Path) -> Iterator[PromptItem]:
    with open(path, encoding="utf-8-sig") as file:
        for line in file:
            if line.strip() and not line.lstrip().startswith("#"):
                yield {"prompt": line.strip(), "attributes": {}}


def _read_jsonl(path: Path) -> Iterator[PromptItem]:
    for number, entry in read_jsonl(path, PromptError, encoding="utf-8-sig"):
        yield parse_entry(entry, f"{path}:{number}")


def _read_csv(path: Path) -> Iterator[PromptItem]:
    with open(path, encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets often write a BOM
        reader = csv.DictReader(file)
        if reader.fieldnames is not None and "prompt" not in reader.fieldnames:
            raise PromptError(f"{path}:1: the header needs a 'prompt' column, got {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise PromptError(f"{where}: expected {len(reader.fieldnames)} fields, as many as the header")
            if not row.get("negative_prompt"):
                row.pop("negative_prompt", None)
            yield parse_entry(row, where)
