"""The examples in README.md and docs/*.md run and print what they show.

The docstrings' examples run as doctests of every package module (``--doctest-modules`` in
pyproject.toml).
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def test_pages_have_examples():
    assert sum(page.name == "README.md" for page, _, _ in BLOCKS) >= 2
    assert len(BLOCKS) >= 8


# Trainer frameworks: CI's trainers job installs them (docs/trainers.md); elsewhere they skip.
FRAMEWORKS = re.compile(r"^(?:from|import) (tunix|qwix|gemma|kauldron)\b", re.M)


def _param(page, index, block):
    # The experiment pages load real pretrained models: minutes, and the data packages.
    marks = [pytest.mark.slow, pytest.mark.data] if page.parent.name == "experiments" else []
    if FRAMEWORKS.search(block):
        marks = [pytest.mark.slow]
    return pytest.param(page, index, block, id=f"{page.relative_to(ROOT)}:{index}", marks=marks)


@pytest.mark.parametrize("page, index, block", [_param(*b) for b in BLOCKS])
def test_python_block_runs(page, index, block):
    from experiments.data.datasets import DatasetNotInstalledError

    del index
    frameworks = sorted(set(FRAMEWORKS.findall(block)))
    for framework in frameworks:
        pytest.importorskip(framework, reason="a trainer framework (docs/trainers.md)")
    # Their models rely on implicit rank promotion, which conftest makes an error.
    promotion = jax.numpy_rank_promotion("allow" if frameworks else "raise")
    try:
        with promotion:
            if block.startswith(">>>"):
                test = doctest.DocTestParser().get_doctest(block, {}, page.name, str(page), 0)
                runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
                runner.run(test)
                assert runner.failures == 0
            else:
                exec(compile(block, str(page), "exec"), {})
    except DatasetNotInstalledError as err:  # a data/model package the README says to install
        pytest.skip(str(err))


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocstrings", reason='pip install -e ".[docs]"')
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    # Cross-references became links, and no reStructuredText role is left to show raw.
    assert 'href="#rplora_jax.pairing.find_lora_pairs"' in api
    raw = {
        str(page.relative_to(tmp_path)): re.findall(
            r":(?:func|class|mod|data|attr|meth):(?:`|<code>)", text
        )
        for page in tmp_path.rglob("*.html")
        for text in [page.read_text()]
    }
    assert {page: roles for page, roles in raw.items() if roles} == {}
