"""Registries: discovered from their package (a new implementation is one file), one lookup style."""

from __future__ import annotations

import sys
import textwrap

import pytest

from grape.cli import build_parser
from grape.errors import InputError
from grape.methods import available_methods
from grape.registry import Registry
from grape.sparsity.scores import CRITERIA


def _write(path, text):
    path.write_text(textwrap.dedent(text))


def test_every_module_of_the_package_registers_itself_on_first_lookup(tmp_path, monkeypatch):
    package = tmp_path / "plugins_for_test"
    package.mkdir()
    _write(package / "__init__.py", 'from grape.registry import Registry\nTHINGS = Registry("thing", package="plugins_for_test")\n')
    for name in ("alpha", "beta"):
        _write(package / f"{name}.py", f"""
            from plugins_for_test import THINGS

            @THINGS.register
            class Thing:
                name = "{name}"
            """)
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugins_for_test import THINGS

    _write(package / "gamma.py", 'from plugins_for_test import THINGS\n\n@THINGS.register\nclass Gamma:\n    name = "gamma"\n')
    assert THINGS.names() == ["alpha", "beta", "gamma"]  # the file added last needs no import line
    assert THINGS.get("beta").name == "beta"
    with pytest.raises(InputError, match="unknown thing 'delta'; available: alpha, beta, gamma"):
        THINGS.get("delta")
    for module in [m for m in sys.modules if m.startswith("plugins_for_test")]:
        del sys.modules[module]


def test_a_name_registers_once():
    things = Registry("thing")

    @things.register
    class One:
        name = "one"

    with pytest.raises(ValueError, match="registered twice"):

        @things.register
        class Again:
            name = "one"


def test_the_command_line_offers_what_the_registries_hold():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    method = {name: next(a for a in commands[name]._actions if a.dest == "method") for name in ("prune", "sparsify")}
    assert method["prune"].choices == available_methods()
    assert method["sparsify"].choices == CRITERIA.names() == ["magnitude", "moe_pruner", "wanda"]
