"""The wheel holds the library only, and requires only jax, optax and numpy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents_and_requirements(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w"]
    result = subprocess.run([*cmd, str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("rplora_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"rplora_jax"}
    assert "rplora_jax/layers/lora_nnx.py" in names and "rplora_jax/py.typed" in names
    assert not [n for n in names if "experiments" in n or "bert" in n or "bible" in n]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
    required = sorted(
        line.split(":", 1)[1].split(">=")[0].strip()
        for line in lines
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert required == ["jax", "numpy", "optax"]
