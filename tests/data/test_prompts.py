"""Prompt sources: template expansion, file loading and the errors for bad input."""

import re

import pytest

from rlmusic_pl.data import PromptError, expand_template, load_prompt_file


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_template_expands_cartesian_product_with_attributes():
    items = expand_template(
        "A recording of a {emotion} {instrument} solo, high quality",
        {"emotion": ["happy", "sad"], "instrument": ["piano", "cello", "flute"]},
    )
    assert len(items) == 6
    assert items[0] == {
        "prompt": "A recording of a happy piano solo, high quality",
        "attributes": {"emotion": "happy", "instrument": "piano"},
    }
    assert items[3]["prompt"] == "A recording of a sad piano solo, high quality"  # first key varies slowest
    assert expand_template("{e} and {e} again", {"e": ["x"]}) == [{"prompt": "x and x again", "attributes": {"e": "x"}}]
    assert expand_template("no placeholders") == [{"prompt": "no placeholders", "attributes": {}}]


@pytest.mark.parametrize(
    ("template", "values", "message"),
    [
        ("A {emotion} {instrument} solo", {"emotion": ["sad"]}, "{instrument} has no values"),
        ("A {emotion} solo", {"emotion": []}, "{emotion} has an empty list"),
        ("A {emotion} solo", {"emotion": "sad"}, "must be a list of strings"),
        ("A {emotion} solo", {"emotion": ["sad", 3]}, "must be a list of strings"),
        ("A {emotion} solo", {"emotion": ["sad"], "tempo": ["fast"]}, "values for 'tempo' given but the template has no {tempo}"),
        ("A {emotion solo", {}, "template 'A {emotion solo'"),
        ("A {} solo", {}, "must be a name"),
    ],
)
def test_template_errors_name_the_key(template, values, message):
    with pytest.raises(PromptError, match=re.escape(message)):
        expand_template(template, values)


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = write(tmp_path, "p.txt", "# emotions\n  happy piano  \n\n\tsad cello\n   # indented comment\n")
    assert load_prompt_file(path) == [
        {"prompt": "happy piano", "attributes": {}},
        {"prompt": "sad cello", "attributes": {}},
    ]


def test_jsonl_reads_attributes_extra_keys_and_negative_prompt(tmp_path):
    path = write(
        tmp_path,
        "p.jsonl",
        '{"prompt": "a", "attributes": {"emotion": "sad"}}\n'
        "\n"
        '{"prompt": "b", "emotion": "happy", "negative_prompt": "noise"}\n',
    )
    assert load_prompt_file(str(path)) == [
        {"prompt": "a", "attributes": {"emotion": "sad"}},
        {"prompt": "b", "attributes": {"emotion": "happy"}, "negative_prompt": "noise"},
    ]


def test_csv_columns_become_attributes(tmp_path):
    path = write(
        tmp_path,
        "p.csv",
        'prompt,emotion,negative_prompt\n"calm, slow piano",tender,\nloud drums,angry,low quality\n',
    )
    assert load_prompt_file(path) == [
        {"prompt": "calm, slow piano", "attributes": {"emotion": "tender"}},  # empty cell keeps the default
        {"prompt": "loud drums", "attributes": {"emotion": "angry"}, "negative_prompt": "low quality"},
    ]


@pytest.mark.parametrize(
    ("name", "text", "line", "message"),
    [
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', 3, "invalid JSON"),
        ("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', 2, "missing or empty 'prompt'"),
        ("p.jsonl", '{"prompt": "a", "tempo": 120}\n', 1, "attribute 'tempo' must be a string"),
        ("p.jsonl", '{"prompt": "a", "attributes": ["sad"]}\n', 1, "'attributes' must be a mapping"),
        ("p.jsonl", '{"prompt": "a", "emotion": "x", "attributes": {"emotion": "y"}}\n', 1, "given twice"),
        ("p.jsonl", '["a"]\n', 1, "expected a prompt string or a mapping"),
        ("p.csv", "text,emotion\na,sad\n", 1, "needs a 'prompt' column"),
        ("p.csv", "prompt,emotion\na,sad\nb,happy,extra\n", 3, "expected 2 fields"),
        ("p.csv", "prompt,emotion\na,sad\n\nb\n", 4, "expected 2 fields"),
        ("p.csv", "prompt,emotion\n ,sad\n", 2, "missing or empty 'prompt'"),
    ],
)
def test_malformed_line_error_names_file_and_line(tmp_path, name, text, line, message):
    path = write(tmp_path, name, text)
    with pytest.raises(PromptError, match=message) as error:
        load_prompt_file(path)
    assert f"{path}:{line}:" in str(error.value)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(PromptError, match="not found") as error:
        load_prompt_file(tmp_path / "nowhere.txt")
    assert str(tmp_path / "nowhere.txt") in str(error.value)


@pytest.mark.parametrize("name", ["empty.txt", "comments.txt", "empty.jsonl", "header_only.csv", "empty.csv"])
def test_file_without_prompts_is_an_error(tmp_path, name):
    text = {"comments.txt": "# nothing\n\n", "header_only.csv": "prompt,emotion\n"}.get(name, "")
    path = write(tmp_path, name, text)
    with pytest.raises(PromptError, match="holds no prompts") as error:
        load_prompt_file(path)
    assert str(path) in str(error.value)


def test_unsupported_extension_and_non_utf8(tmp_path):
    with pytest.raises(PromptError, match=r"unsupported prompt file type '\.yaml'"):
        load_prompt_file(write(tmp_path, "p.yaml", "- a\n"))
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 piano\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8") as error:
        load_prompt_file(path)
    assert str(path) in str(error.value)
