"""The examples in the docstrings and in README.md run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


MODULES = [
    "pairing",
    "preconditioner",
    "linen",
    "nnx",
    "inject",
    "adapters",
    "sharding",
    "checkpoint",
    "bible",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"rplora_jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    from rplora_jax.data import DatasetNotInstalledError

    block = BLOCKS[index]
    try:
        if block.startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(block, {}, "README", str(README), 0)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
            runner.run(test)
            assert runner.failures == 0
        else:
            exec(compile(block, str(README), "exec"), {})
    except DatasetNotInstalledError as err:  # a data/model package the README says to install
        pytest.skip(str(err))
