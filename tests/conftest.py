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
collect_ignore = ["multidevice_checks.py", "shard_map_checks.py"]
