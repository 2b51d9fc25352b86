"""Runs groups of tests/multidevice_checks.py in fresh processes with 8 virtual CPU devices.

A fresh process is needed because the device count is fixed when JAX initialises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_multidevice(group: str, out_dir: Path, *args: str) -> dict:
    """Runs a group of tests/multidevice_checks.py in a fresh 8-device process."""
    out = out_dir / f"{group}.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "multidevice_checks.py"), group, str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
