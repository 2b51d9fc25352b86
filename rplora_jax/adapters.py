"""Saving and loading adapters: only the LoRA factors, as a safetensors file.

An adapter is a flat ``{path: array}`` dict of the factors the pairing finds
([`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]), addressed by ``/``-joined path tokens
such as ``"params/block_0/attn/query/lora_a"``.

File format: **safetensors**, not orbax-checkpoint. An adapter is a small, flat set of named
tensors, which is what safetensors stores: one file, no pickle (safe to load from untrusted
sources), exact bytes for every dtype including bfloat16, and string metadata for the LoRA
options. orbax-checkpoint targets large sharded training state (see ``examples/checkpointing.py``).
File I/O needs the ``adapters`` extra (``pip install rplora_jax[adapters]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rplora_jax._trees import as_param_tree, path_str
from rplora_jax.pairing import RuleSpec, _factor_paths


def extract_adapter(
    tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> dict[str, jax.Array]:
    """The LoRA factors of ``tree`` as a flat ``{path: array}`` dict.

    Args:
      tree: parameters (nested dicts, ``nnx.State``, an ``nnx.Module``...).
      rules: pairing rules.

    Returns:
      ``{"params/block_0/query/lora_a": array, ...}``.
    """
    tree = as_param_tree(tree)
    factors = _factor_paths(tree, rules=rules)
    if not factors:
        raise ValueError("extract_adapter: no LoRA factors found in the tree.")
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        path: leaf for path, leaf in ((path_str(p), leaf) for p, leaf in flat) if path in factors
    }


def apply_adapter(
    tree: Any,
    adapter: Mapping[str, Any],
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
) -> Any:
    """Returns ``tree`` with its LoRA factors replaced by ``adapter``'s.

    Every factor of ``tree`` must be in ``adapter`` and vice versa, with equal shapes and dtypes.

    Args:
      tree: parameters with LoRA factors (their values are ignored), e.g. from ``init`` or
        ``nnx.state(model, nnx.LoRAParam)``.
      adapter: ``{path: array}`` from [`extract_adapter`][rplora_jax.adapters.extract_adapter] /
        [`load_adapter`][rplora_jax.adapters.load_adapter].
      rules: pairing rules.

    Returns:
      The updated tree (for NNX: ``nnx.update(model, apply_adapter(state, adapter))``).
    """
    return _replace_factors(tree, adapter, _factor_paths(tree, rules=rules))


def _replace_factors(tree: Any, adapter: Mapping[str, Any], factors: set[str]) -> Any:
    """``apply_adapter`` for a tree whose factor paths the caller has found already."""
    missing = sorted(factors - adapter.keys())
    unexpected = sorted(adapter.keys() - factors)
    if missing or unexpected:
        raise ValueError(
            f"apply_adapter: adapter does not fit the parameters. Factors without a value: "
            f"{missing}; adapter entries with no such factor: {unexpected}."
        )

    def replace(p, leaf):
        path = path_str(p)
        if path not in factors:
            return leaf
        new = adapter[path]
        if np.shape(new) != np.shape(leaf) or jnp.result_type(new) != jnp.result_type(leaf):
            raise ValueError(
                f"apply_adapter: '{path}' is {jnp.result_type(new)}{list(np.shape(new))} in the "
                f"adapter but {jnp.result_type(leaf)}{list(np.shape(leaf))} in the parameters."
            )
        # Placed like the leaf it replaces, so loading into sharded parameters keeps their
        # shardings (jnp.asarray put every factor on one device).
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            return jax.device_put(new, sharding)
        return jnp.asarray(new)

    return jax.tree_util.tree_map_with_path(replace, tree)


def save_adapter(
    file: str,
    tree: Any,
    *,
    metadata: Mapping[str, str] | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
) -> dict[str, jax.Array]:
    """Saves only the LoRA factors of ``tree`` to a safetensors file.

    Args:
      file: destination path (conventionally ``*.safetensors``).
      tree: parameters, ``nnx.State`` or ``nnx.Module`` with factors, or an adapter dict from
        [`extract_adapter`][rplora_jax.adapters.extract_adapter].
      metadata: strings to store with it (rank, alpha, targets...).
      rules: pairing rules.

    Returns:
      The saved ``{path: array}`` dict.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> params = {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> file = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
      >>> _ = save_adapter(file, params, metadata={"alpha": "16"})
      >>> sorted(load_adapter(file)), read_adapter_metadata(file)["alpha"]
      (['lora_a', 'lora_b'], '16')
    """
    from safetensors.flax import save_file

    # A flat {path: array} adapter is itself a tree whose factor paths are its keys.
    adapter = extract_adapter(tree, rules=rules)
    meta = {"format": "rplora_jax.adapter", **dict(metadata or {})}
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(
            f"save_adapter: metadata keys and values must be strings; bad keys: {bad}."
        )
    save_file({k: jnp.asarray(v) for k, v in adapter.items()}, file, metadata=meta)
    return adapter


def load_adapter(
    file: str, into: Any = None, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> Any:
    """Loads an adapter saved by [`save_adapter`][rplora_jax.adapters.save_adapter].

    Args:
      file: the safetensors file.
      into: optional parameters to load it into (see
        [`apply_adapter`][rplora_jax.adapters.apply_adapter]).
      rules: pairing rules, used with ``into``.

    Returns:
      ``{path: array}``, or ``into`` with its factors replaced when ``into`` is given.
    """
    from safetensors.flax import load_file

    adapter = load_file(file)
    return adapter if into is None else apply_adapter(into, adapter, rules=rules)


def read_adapter_metadata(file: str) -> dict[str, str]:
    """The string metadata stored by [`save_adapter`][rplora_jax.adapters.save_adapter]."""
    from safetensors import safe_open

    with safe_open(file, framework="flax") as f:
        return dict(f.metadata() or {})
