"""Parameter trees as the library reads them: leaf paths, Flax NNX containers, base kernels.

Needs only JAX and Optax: Flax is looked up in ``sys.modules``, never imported, since nothing can
be an ``nnx.Module`` or ``nnx.Variable`` before Flax is.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection
from typing import Any

import jax
import optax

_VALUE_ATTRS = ("value", "raw_value")


def is_masked(x: Any) -> bool:
    """Whether ``x`` is a leaf masked out by ``optax.partition`` / ``optax.masked``."""
    return isinstance(x, optax.MaskedNode)


def path_tokens(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Turns a JAX key path into the string tokens the pairing rules see."""
    tokens: list[str] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            # flax.traverse_util.flatten_dict's keys are tuples of names.
            parts = key.key if isinstance(key.key, tuple) else (key.key,)
            tokens.extend(t for part in parts for t in re.split(r"[./]", str(part)) if t)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            tokens.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            tokens.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            tokens.append(str(key.key))
        else:
            tokens.append(str(key))
    # nnx.Variable leaves add a `.value` attribute that is not part of the module path.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in _VALUE_ATTRS:
        tokens.pop()
    return tuple(tokens)


def path_str(keypath: tuple[Any, ...]) -> str:
    """The ``/``-joined path tokens of a JAX key path, as the pairing and errors name leaves."""
    return "/".join(path_tokens(keypath))


def is_nnx_module(tree: Any) -> bool:
    """Whether ``tree`` is an ``nnx.Module``."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(tree, nnx.Module)


def unwrap_variables(tree: Any) -> Any:
    """``tree`` with each ``nnx.Variable`` replaced by its value."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def as_param_tree(tree: Any) -> Any:
    """``tree``, or for an ``nnx.Module`` its ``nnx.Param`` state (LoRA factors included)."""
    if is_nnx_module(tree):
        from flax import nnx

        return nnx.state(tree, nnx.Param)
    return tree


# qwix names its factors <w>_lora_a / <w>_lora_b after the weight <w> they adapt.
QWIX_FACTOR = re.compile(r"^(.+)_lora_([ab])$")
# Names under which base weights are stored next to (or above) their LoRA factors: Flax and this
# library's layers, gemma's "w", PyTorch/PEFT's "weight", embeddings.
KERNEL_NAMES: tuple[str, ...] = ("kernel", "w", "weight", "embedding")
_SEARCH_DEPTH = 3


def find_kernel(a_path: str, b_path: str, paths: Collection[str]) -> str | None:
    """The path of the base kernel of the pair ``a_path`` / ``b_path`` among ``paths``.

    Looks for a qwix ``<w>`` sibling of ``<w>_lora_a``, then, from the factor's parent upwards (3
    levels), for a leaf named one of `KERNEL_NAMES` or ``base_layer/weight`` (PEFT).
    """
    tokens = tuple(a_path.split("/"))
    found = QWIX_FACTOR.match(tokens[-1])
    if found is not None:
        candidate = "/".join((*tokens[:-1], found.group(1)))
        if candidate in paths:
            return candidate
    for depth in range(1, _SEARCH_DEPTH + 1):
        prefix = tokens[:-depth]
        for name in (*((n,) for n in KERNEL_NAMES), ("base_layer", "weight")):
            candidate = "/".join((*prefix, *name))
            if candidate in paths and candidate not in (a_path, b_path):
                return candidate
    return None
