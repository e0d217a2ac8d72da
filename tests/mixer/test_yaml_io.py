"""The one YAML loader: YAML 1.2 floats, duplicate keys refused, errors naming the file."""

from __future__ import annotations

import pytest

from mixer.yaml_io import YamlError, load_yaml


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
