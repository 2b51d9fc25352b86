"""The notebooks in notebooks/: sources in sync, they run top to bottom, committed outputs complete.

Each notebook's source is ``notebooks/<name>.py`` in jupytext's percent format (ruff checks it);
``notebooks/<name>.ipynb`` is its jupytext pair and carries the outputs of a full-size run. Here
(1) both files of each pair must have the same cells, (2) each notebook is executed from its
``.py`` source in a fresh kernel with ``RPLORA_NOTEBOOK_SMOKE=1`` (fewer steps, a smaller sweep),
so any error, including a failed ``assert`` in a notebook cell, fails the test, and (3) the
committed ``.ipynb`` must hold the complete outputs of a full-size run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SMOKE_ENV = "RPLORA_NOTEBOOK_SMOKE"
FORMATS = "ipynb,py:percent"
# How to bring the .ipynb files up to date with their sources (CONTRIBUTING.md, "Notebooks").
REEXECUTE = "jupytext --sync notebooks/*.py && jupyter execute --inplace notebooks/*.ipynb"
# name -> (number of plots, text the first output shows in the full-size run)
EXPECTED = {
    "quickstart": (2, "300 steps"),
    "lr_robustness": (2, "500 steps x batch 128, seeds [0, 1, 2], 13 learning rates"),
}


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def _outputs(nb, output_type=None):
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if output_type is None or out.output_type == output_type
    ]


def _plots(nb) -> int:
    return sum("image/png" in out.get("data", {}) for out in _outputs(nb))


def test_every_notebook_is_a_pair():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(EXPECTED)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pair_is_in_sync(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    committed = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    for nb in (source, committed):
        assert nb.metadata.get("jupytext", {}).get("formats") == FORMATS
    assert _cells(committed) == _cells(source), (
        f"notebooks/{name}.ipynb differs from notebooks/{name}.py: run {REEXECUTE}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_at_smoke_size(name, monkeypatch):
    monkeypatch.setenv(SMOKE_ENV, "1")  # the kernel inherits the environment
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the working directory, as in Jupyter
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any failing cell
    elapsed = time.perf_counter() - start
    assert not _outputs(nb, "error")
    assert _plots(nb) == EXPECTED[name][0]
    first = _outputs(nb, "stream")[0].text
    assert EXPECTED[name][1] not in first, f"the notebook ignored {SMOKE_ENV}"
    assert elapsed < 180, f"{name} took {elapsed:.0f} s at smoke size"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_has_full_size_outputs(name):
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(committed)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{name}.ipynb was not executed top to bottom in one go: run {REEXECUTE}"
    )
    assert all(c.outputs for c in code), f"{name}.ipynb has a code cell without output"
    assert not _outputs(committed, "error")
    assert _plots(committed) == EXPECTED[name][0]
    assert EXPECTED[name][1] in _outputs(committed, "stream")[0].text, (
        f"{name}.ipynb's outputs are not from the full-size run: run {REEXECUTE} "
        f"without {SMOKE_ENV} set"
    )
