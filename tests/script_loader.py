"""Loads the repository's scripts (examples, benchmarks) as modules."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """Imports ``ROOT / relative`` as a module named after the file, as running it would.

    Its folder goes on ``sys.path`` (a script run as ``python folder/x.py`` sees its siblings),
    and the module is registered in ``sys.modules`` (dataclasses look their module up there).
    """
    path = ROOT / relative
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
