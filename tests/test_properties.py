"""Properties that tie fmt and diff together on every built-in spec."""

import pytest

from alignspec.dsl.diff import diff_specs
from alignspec.dsl.fmt import format_text
from alignspec.dsl.load import builtin_dir, builtin_names
from alignspec.dsl.parser import parse

SPECS = [n for n in builtin_names() if n != "rlhf"]


@pytest.mark.parametrize("name", SPECS)
def test_diff_of_spec_and_its_format_is_empty(name, tmp_path):
    path = builtin_dir() / f"{name}.align"
    text = path.read_text()
    # a reformatted copy next to the built-ins' names: write it where `extends` and `import` still resolve
    messy = text.replace("\n  ", "\n      ")  # re-indented (strings and comments untouched)
    formatted = format_text(messy, str(path))
    assert parse(formatted, "x") == parse(text, "x")
    copy = tmp_path / f"{name}.align"
    copy.write_text(formatted)
    for dep in ("common", "grpo", "sppo"):
        dst = tmp_path / f"{dep}.align"
        if not dst.exists():
            dst.write_text((builtin_dir() / f"{dep}.align").read_text())
    assert diff_specs(str(path), str(copy)) == []
