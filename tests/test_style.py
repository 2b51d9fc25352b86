"""The code base stays ruff-clean (lint and format), as CI checks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    paths = ["rplora_jax", "tests", "examples", "benchmarks", "experiments", "scripts", "notebooks"]
    result = subprocess.run([ruff, *args, *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
