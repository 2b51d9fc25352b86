"""The public API is ``rplora_jax.__all__`` plus what ``docs/api.md`` documents, and nothing else.

Every name a public module defines without a leading underscore must be on the API page, every
name on the page must exist, and docstrings use the site's Markdown (mkdocstrings
cross-references), not reStructuredText roles, which the site would show raw.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rplora_jax"
DOCUMENTED = re.findall(r"^::: (rplora_jax\.[\w.]+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
PUBLIC_MODULES = sorted(
    ".".join(f.relative_to(ROOT).with_suffix("").parts)
    for f in PACKAGE.rglob("*.py")
    if f.name != "__init__.py" and not any(p.startswith("_") for p in f.relative_to(ROOT).parts)
)
# A reStructuredText role (:func:`x`) or link (`text <url>`_).
RST = re.compile(r":(func|class|mod|data|attr|meth|ref|obj|exc):`|`[^`]*<[^`>]+>`_")


def defined_names(module: str) -> set[str]:
    """Names a module binds at its top level itself: definitions, assignments, and explicit
    re-exports (``from x import name as name``)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.asname and a.asname == a.name}
    return names


def test_the_modules_are_the_packages_files():
    assert "rplora_jax.preconditioner" in PUBLIC_MODULES
    assert "rplora_jax.layers.lora_nnx" in PUBLIC_MODULES
    assert not any("._" in m for m in PUBLIC_MODULES)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_a_modules_public_names_are_the_ones_on_the_api_page(module):
    if ".layers." in module:
        pytest.importorskip("flax")
    on_page = {d.rsplit(".", 1)[1] for d in DOCUMENTED if d.rsplit(".", 1)[0] == module}
    public = {n for n in defined_names(module) if not n.startswith("_")}
    assert public - on_page == set(), f"public in {module} but not on docs/api.md"
    loaded = importlib.import_module(module)
    assert {n for n in on_page if not hasattr(loaded, n)} == set(), "on the page, not in code"


def test_every_name_on_the_api_page_is_in_a_public_module():
    assert {d.rsplit(".", 1)[0] for d in DOCUMENTED} <= set(PUBLIC_MODULES)


def test_every_top_level_name_is_on_the_api_page():
    import rplora_jax

    documented = {d.rsplit(".", 1)[1] for d in DOCUMENTED}
    assert sorted(set(rplora_jax.__all__) - documented) == []


def test_the_public_names_test_sees_an_undocumented_name():
    # The check above must fail for a module that grows a public helper.
    assert "find_lora_pairs" in defined_names("rplora_jax.pairing")
    assert "default_module_name" in defined_names("rplora_jax.peft_format")  # a re-export
    assert not {"annotations", "jax", "Any"} & defined_names("rplora_jax.pairing")


@pytest.mark.parametrize("file", sorted(PACKAGE.rglob("*.py")), ids=lambda f: f.name)
def test_docstrings_use_markdown_not_rst(file):
    found = [f"{i}: {line.strip()}" for i, line in enumerate(file.read_text().splitlines(), 1)]
    assert [line for line in found if RST.search(line)] == []
