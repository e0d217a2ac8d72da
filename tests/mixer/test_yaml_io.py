"""The one YAML loader: YAML 1.2 floats, duplicate keys and aliases refused, hostile files refused at
once, errors naming the file."""

from __future__ import annotations

import re

import pytest

from mixer.yaml_io import MAX_BYTES, YamlError, load_yaml


def write(tmp_path, text: str):
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("1E-4", 1e-4), ("-2e3", -2000.0), ("+1e+2", 100.0), ("1.0e-4", 1e-4),
    ("0.5", 0.5), (".5", 0.5), ("3", 3), ("'1e-4'", "1e-4"), ("1e-4x", "1e-4x"),
])
def test_exponent_notation_is_a_float_and_the_rest_is_as_pyyaml_reads_it(tmp_path, text, value):
    loaded = load_yaml(write(tmp_path, f"lr: {text}\n"))["lr"]
    assert loaded == value and type(loaded) is type(value)


def test_duplicate_keys_are_refused_naming_the_key_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(YamlError, match=r"duplicate key 'lr' \(line 3\)") as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}: not valid YAML")


def test_a_missing_file_or_bad_yaml_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(YamlError, match=rf"^{tmp_path / 'missing.yaml'}: cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(YamlError, match="not valid YAML"):
        load_yaml(write(tmp_path, "a: [1, 2\n"))


def test_only_plain_data_is_built(tmp_path):
    with pytest.raises(YamlError, match="not valid YAML"):
        load_yaml(write(tmp_path, "x: !!python/object/apply:os.system ['true']\n"))


# ----------------------------------------------------------------------------------- hostile files


def test_aliases_are_refused_naming_the_line(tmp_path):
    path = write(tmp_path, "base: &b {lr: 0.1}\ntrain: *b\n")
    with pytest.raises(YamlError, match=r"aliases are not allowed \(\*b\)") as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}: not valid YAML") and "line 2" in str(err.value)


def test_a_merge_key_needs_an_alias_and_is_refused_too(tmp_path):
    with pytest.raises(YamlError, match="aliases are not allowed"):
        load_yaml(write(tmp_path, "base: &b {lr: 0.1}\ntrain:\n  <<: *b\n  dim: 8\n"))


def test_a_directory_is_refused_as_not_a_regular_file(tmp_path):
    # /dev/zero and a FIFO are tried in a subprocess (tests/sweep/test_space.py): on a loader that
    # reads them they would exhaust memory or block.
    with pytest.raises(YamlError, match=rf"^{re.escape(str(tmp_path))}: not a regular file"):
        load_yaml(tmp_path)


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path, "#" * MAX_BYTES + "\n")  # valid YAML (a comment), one byte too many
    with pytest.raises(YamlError, match=rf"^{re.escape(str(path))}: larger than 1 MiB"):
        load_yaml(path)


def test_text_that_is_not_utf8_is_refused_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("study: café\n".encode("latin-1"))
    with pytest.raises(YamlError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 10 is 0xe9\)"):
        load_yaml(path)


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
    ("a: " + "9" * 5000 + "\n", "4300 digits"),
    ("a: 2024-13-45\n", "month must be in 1..12"),
])
def test_documents_python_cannot_build_are_yaml_errors(tmp_path, text, message):
    with pytest.raises(YamlError, match=message) as err:
        load_yaml(write(tmp_path, text))
    assert "not valid YAML" in str(err.value) and len(str(err.value)) < 300


def test_a_duplicate_long_key_is_cut_in_the_message(tmp_path):
    key = "k" * 1000
    with pytest.raises(YamlError, match=r"duplicate key 'k+\.\.\.k+' \(line 2\)") as err:
        load_yaml(write(tmp_path, f"{key}: 1\n{key}: 2\n"))
    assert len(str(err.value)) < 600  # PyYAML's own snippet of the line is cut at about 75 characters
