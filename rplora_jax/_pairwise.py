"""What every optimizer over LoRA pairs does around its rule: pair the parameters, check the
gradients against them, validate the mesh arguments, and hand the rule its chunks.

A *rule* takes a chunk of pairs of one kind (lists of factors ``a``, ``b`` and gradients
``g_a``, ``g_b``, with the chunk's ``_grouping.Kind``) and returns the new ``g_a``, ``g_b``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from rplora_jax import _grouping, _mesh
from rplora_jax._trees import is_masked
from rplora_jax.pairing import _match_pairs, _no_pairs_error

Rule = Callable[..., tuple[list, list]]


class Setup(NamedTuple):
    """What an optimizer over pairs was built with: how to find and sum its pairs."""

    who: str  # the public factory, for error messages
    rules: Any
    stacked_axes: int | None
    allow_no_pairs: bool
    axis_names: tuple[str, ...] | None
    specs: Any


def setup(who, *, rules, stacked_axes, allow_no_pairs, axis_name, specs) -> Setup:
    """The checked arguments, so that a bad one fails where it is given."""
    axis_names = _mesh.check_axis_name(axis_name)
    if axis_names is not None and specs is not None:
        raise ValueError(
            f"{who}: pass axis_name or specs, not both (specs says which axes each factor is "
            "sharded over, axis_name only which axes to sum over)."
        )
    return Setup(who, rules, stacked_axes, allow_no_pairs, axis_names, specs)


def find(s: Setup, params) -> tuple[list, list, Any]:
    """The pairs of ``params``, its leaves and its treedef; no pairs is an error unless allowed."""
    pairs, leaves, treedef = _match_pairs(params, rules=s.rules, stacked_axes=s.stacked_axes)
    if not pairs and not s.allow_no_pairs:
        raise _no_pairs_error(params, s.who)
    return pairs, leaves, treedef


def gradients(s: Setup, updates, params) -> tuple[list, list, list, Any]:
    """``(pairs, param leaves, gradient leaves, treedef)``, the gradients checked against the
    parameters (paired on the parameters, so a gradient of the wrong shape is named as such)."""
    if params is None:
        raise ValueError(
            f"{s.who} needs the current parameters: call update(updates, state, params)."
        )
    pairs, p_leaves, treedef = find(s, params)
    g_leaves, g_treedef = jax.tree_util.tree_flatten(updates, is_leaf=is_masked)
    if g_treedef != treedef:
        raise ValueError(
            "params and updates have different tree structures:\n"
            f"  updates: {g_treedef}\n  params:  {treedef}"
        )
    for pair in pairs:
        for path, i in ((pair.info.a_path, pair.a_index), (pair.info.b_path, pair.b_index)):
            if np.shape(p_leaves[i]) != np.shape(g_leaves[i]):
                raise ValueError(
                    f"Gradient at '{path}' has shape {np.shape(g_leaves[i])} but its parameter "
                    f"has shape {np.shape(p_leaves[i])}."
                )
    return pairs, p_leaves, g_leaves, treedef


def chunks(s: Setup, pairs, p_leaves, g_leaves, params, tuning: _grouping.Tuning):
    """The chunks of pairs of one kind, each as ``(pairs, kind, a, b, g_a, g_b)``."""
    sum_axes = _mesh.sum_axes(s.axis_names, s.specs, params, s.who)
    for chunk, kind in _grouping.chunks(pairs, p_leaves, g_leaves, sum_axes, tuning):
        a, b = [p_leaves[p.a_index] for p in chunk], [p_leaves[p.b_index] for p in chunk]
        g_a, g_b = [g_leaves[p.a_index] for p in chunk], [g_leaves[p.b_index] for p in chunk]
        yield chunk, kind, a, b, g_a, g_b


def transformation(s: Setup, rule: Rule, tuning: _grouping.Tuning) -> optax.GradientTransformation:
    """A stateless transformation applying ``rule`` to every chunk; other leaves pass through."""

    def init_fn(params):
        find(s, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        pairs, p_leaves, g_leaves, treedef = gradients(s, updates, params)
        if not pairs:
            return updates, state
        out = list(g_leaves)
        for chunk, kind, a, b, g_a, g_b in chunks(s, pairs, p_leaves, g_leaves, params, tuning):
            new_a, new_b = rule(a, b, g_a, g_b, kind=kind, tuning=tuning)
            for pair, x, y in zip(chunk, new_a, new_b, strict=True):
                out[pair.a_index], out[pair.b_index] = x, y
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)
