"""Test configuration: make rank and dtype promotion surprises raise, as equinox's tests do.

Rank promotion raises everywhere. Strict dtype promotion is a fixture, not global, because optax's
own Adam (``decay ** count`` with an int32 count) does not run under it; tests of this library's
own transformations use it.
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


# Scripts run in their own processes (they configure JAX's device count at import), not modules
# to import for doctests.
collect_ignore = ["multidevice_checks.py", "shard_map_checks.py", "successor_checks.py"]


@pytest.fixture(scope="session")
def successor_report(tmp_path_factory):
    """tests/successor_checks.py's report: LoRA-RITE and RefLoRA on 8 devices, run once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("successors") / "report.json"
    script = Path(__file__).resolve().parent / "successor_checks.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
