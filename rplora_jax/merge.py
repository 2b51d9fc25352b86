"""Folding LoRA into the base weights (``W0 <- W0 + s * a @ b``) and back.

One entry point, [`merge`][rplora_jax.merge.merge], for both kinds of model: a nested dict of
parameters (linen variables, ``nnx.to_pure_dict(state)``, any hand-written model), or an
``nnx.Module`` (its LoRA layers become plain layers). An NNX LoRA layer stores its scale; a dict
does not, so ``scale`` is required there. Folding runs in float32 (or wider) and is cast to the
kernel's dtype; an integer (quantized) kernel is refused rather than silently truncated.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rplora_jax._linalg import fold_delta
from rplora_jax._trees import is_nnx_module, path_str, path_tokens
from rplora_jax.pairing import NNX, QWIX, LoRAPair, RuleSpec, _no_pairs_error, find_lora_pairs


def _flatten(tree: Any) -> tuple[dict[tuple, Any], dict[str, tuple]]:
    """Flat ``{key tuple: leaf}`` of a nested mapping, and ``{token path: key tuple}``."""
    if not isinstance(tree, Mapping):
        raise TypeError(
            "merge/unmerge take a nested dict of parameters (linen variables, or "
            f"nnx.to_pure_dict(state)) or an nnx.Module; got {type(tree).__name__}."
        )
    flat: dict[tuple, Any] = {}

    def visit(node, prefix):
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                visit(value, (*prefix, key))
            else:
                flat[(*prefix, key)] = value

    visit(tree, ())
    index = {
        "/".join(path_tokens(tuple(jax.tree_util.DictKey(k) for k in key))): key for key in flat
    }
    return flat, index


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return out


def _kernel_tokens(pair: LoRAPair, index: Mapping[str, tuple]) -> tuple[str, ...]:
    """The token path of the base kernel that ``pair`` adapts. Stricter than the pairing's
    search (``_trees.find_kernel``): merge writes into it, so only the layouts whose
    kernel it knows (a ``kernel`` next to ``lora_a`` or to ``nnx.LoRALinear``'s ``lora``;
    qwix's ``<w>``)."""
    a = tuple(pair.a_path.split("/"))
    if pair.rule == NNX.name:
        candidates = [(*a[:-1], "kernel")]
        if len(a) >= 2 and a[-2] == "lora":  # nnx.LoRALinear: <layer>/lora/lora_a
            candidates.append((*a[:-2], "kernel"))
    elif pair.rule == QWIX.name:  # qwix: <w>_lora_a next to <w>
        candidates = [(*a[:-1], a[-1][: -len("_lora_a")])]
    else:
        raise ValueError(
            f"merge: cannot fold the pair '{pair.a_path}' (rule {pair.rule}): merge knows where "
            "the base kernel is for lora_a/lora_b next to a 'kernel' (this library, "
            "nnx.LoRA/nnx.LoRALinear) and for qwix's <w>_lora_a/<w>_lora_b next to <w>."
        )
    for c in candidates:
        if "/".join(c) in index:
            return c
    raise ValueError(
        f"merge: no base kernel for the LoRA factor '{pair.a_path}' (looked for "
        f"{['/'.join(c) for c in candidates]})."
    )


def _factor_key(kernel_key: tuple, n_kernel_tokens: int, path: str) -> tuple:
    """The real key of the factor at token ``path``, laid out like its kernel's key.

    Nested dicts have one key per token; a flat key that holds several tokens ('q.kernel')
    gives the factor one key in the same dict, joined the same way ('q.lora_a').
    """
    parent, last = kernel_key[:-1], kernel_key[-1]  # the real keys (ints for nnx lists)
    last_tokens = path_tokens((jax.tree_util.DictKey(last),))
    tail = path.split("/")[n_kernel_tokens - len(last_tokens) :]
    if len(last_tokens) == 1:
        return (*parent, *tail)
    if isinstance(last, tuple):  # flax.traverse_util.flatten_dict's tuple keys
        # The kernel's own key parts where the factor's path agrees (ints of nnx lists stay ints).
        same = lambda i, t: i < len(last) and str(last[i]) == t
        return (*parent, tuple(last[i] if same(i, t) else t for i, t in enumerate(tail)))
    return (*parent, re.findall(r"[./]", str(last))[-1].join(tail))


def _fold(
    flat, index, pairs: Sequence[LoRAPair], scale: float | Callable[[str], float], sign: float
) -> None:
    for pair in pairs:
        kkey = index["/".join(_kernel_tokens(pair, index))]
        kernel_path = "/".join(map(str, kkey))
        kernel = jnp.asarray(flat[kkey])
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(
                f"merge: the kernel '{kernel_path}' is {kernel.dtype}; folding LoRA into it would "
                "truncate the result. Dequantize it first (merge into a float copy)."
            )
        a, b = flat[index[pair.a_path]], flat[index[pair.b_path]]
        delta = fold_delta(jnp.asarray(a), jnp.asarray(b), len(pair.stacked_shape))
        if delta.shape != kernel.shape:
            raise ValueError(
                f"merge: a @ b of '{pair.a_path}' has shape {delta.shape}, but its kernel "
                f"'{kernel_path}' has shape {kernel.shape}."
            )
        s = sign * float(scale(pair.a_path) if callable(scale) else scale)
        flat[kkey] = (kernel.astype(delta.dtype) + s * delta).astype(kernel.dtype)


# Returning a tree without pairs unchanged would hide factors the rules did not recognise.
_FOLDS = (
    "; merge folds lora_a/lora_b next to a 'kernel' (this library, nnx.LoRA/nnx.LoRALinear) "
    "and qwix's <w>_lora_a/<w>_lora_b next to <w>"
)


def _need_scale(scale: Any, fn: str) -> None:
    is_number = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if scale is not None and not callable(scale) and not is_number:
        raise TypeError(
            f"{fn}: scale must be a number (LoRAConfig.scale) or a callable a_path -> scale, "
            f"got {scale!r}."
        )
    if scale is None:
        raise TypeError(
            f"{fn}(params) needs scale=: the LoRA scale s of W0 + s * a @ b "
            "(LoRAConfig(...).scale, alpha / rank), or a callable a_path -> s. A parameter "
            "dict does not record it, and a wrong scale silently gives another model."
        )


def merge(
    tree: Any,
    *,
    scale: float | Callable[[str], float] | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    keep_factors: bool = False,
) -> Any:
    """Folds every LoRA pair into its base kernel: ``kernel <- kernel + s * a @ b``.

    Given an ``nnx.Module``, returns a copy whose LoRA layers (this library's, and Flax's
    ``nnx.LoRALinear``) are the plain layers they extend, with their stored scale; ``scale`` must
    not be given. Given a nested dict, returns the dict of the model *without* LoRA (factors removed
    unless ``keep_factors``), e.g. the original model's variables for
    [`inject_linen`][rplora_jax.layers.inject.inject_linen] (its ``LinenLoRA.merge`` passes the
    scale for you). Either way the input is not changed, and a LoRA factor that cannot be folded is
    a ``ValueError`` naming it, never a silently unmerged result.

    Args:
      tree: a nested dict of parameters, or an ``nnx.Module``.
      scale: for a dict: the LoRA scale ``s`` (``LoRAConfig.scale``), or a callable
        ``a_path -> s``. Required for dicts.
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs] (dicts).
      stacked_axes: leading stacked-layer axes of every pair, as for
        [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs] (dicts); ``None`` infers them.
      keep_factors: keep the factors in the result (dicts); zero ``lora_b`` yourself before
        using it with a LoRA model, or the term is counted twice.

    Returns:
      The merged dict or module.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...           "lora_b": jnp.ones((1, 2))}
      >>> merged = merge(params, scale=0.5)
      >>> sorted(merged), merged["kernel"].tolist()
      (['kernel'], [[0.5, 0.5], [0.5, 0.5]])
    """
    if is_nnx_module(tree):
        if scale is not None or rules is not None or stacked_axes is not None or keep_factors:
            raise ValueError(
                "merge(nnx.Module) takes no scale/rules/stacked_axes/keep_factors: each LoRA "
                "layer stores its own scale and layout."
            )
        from rplora_jax.layers.lora_nnx import _merge_module

        return _merge_module(tree)
    _need_scale(scale, "merge")
    flat, index = _flatten(tree)
    pairs = find_lora_pairs(tree, rules=rules, stacked_axes=stacked_axes)
    if not pairs:
        raise _no_pairs_error(tree, "merge", hint=_FOLDS)
    _fold(flat, index, pairs, scale, 1.0)
    if not keep_factors:
        for pair in pairs:
            del flat[index[pair.a_path]], flat[index[pair.b_path]]
    return _unflatten(flat)


def unmerge(
    merged: Any,
    adapter: Mapping[str, Any],
    *,
    scale: float | Callable[[str], float] | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
) -> dict:
    """Undoes [`merge`][rplora_jax.merge.merge] on a dict: puts the factors back, subtracts ``s * a
    @ b``.

    The kernels come back up to float rounding (one add and one subtract); keep the unmerged
    parameters if you need them bit-exact.

    Args:
      merged: merged nested dict (factors removed), e.g. ``nnx.to_pure_dict`` of a state.
      adapter: ``{path: array}`` as returned by
        [`extract_adapter`][rplora_jax.adapters.extract_adapter] or
        [`load_adapter`][rplora_jax.adapters.load_adapter].
      scale: the LoRA scale, or a callable ``a_path -> s``. Required.
      rules: pairing rules.
      stacked_axes: as for [`merge`][rplora_jax.merge.merge].

    Returns:
      The nested dict with the factors and the base kernels.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...           "lora_b": jnp.ones((1, 2))}
      >>> merged = merge(params, scale=0.5)
      >>> back = unmerge(merged, {"lora_a": params["lora_a"], "lora_b": params["lora_b"]},
      ...                scale=0.5)
      >>> sorted(back), back["kernel"].tolist()
      (['kernel', 'lora_a', 'lora_b'], [[0.0, 0.0], [0.0, 0.0]])
    """
    _need_scale(scale, "unmerge")
    flat, index = _flatten(merged)
    # By token path, whatever the adapter's keys: "/"-joined paths, nested dicts, tuples.
    leaves = {path_str(k): x for k, x in jax.tree_util.tree_flatten_with_path(dict(adapter))[0]}
    # Paired next to the merged kernels, which settle shapes that read two ways, as in merge.
    probe = {path: flat[key] for path, key in index.items()} | leaves
    pairs = [
        p
        for p in find_lora_pairs(probe, rules=rules, stacked_axes=stacked_axes)
        if p.a_path in leaves
    ]
    if not pairs:
        raise _no_pairs_error(adapter, "unmerge (in the adapter)", hint=_FOLDS)
    for pair in pairs:
        kernel = _kernel_tokens(pair, index)
        for path in (pair.a_path, pair.b_path):
            key = _factor_key(index["/".join(kernel)], len(kernel), path)
            flat[key] = leaves[path]
            index[path] = key
    _fold(flat, index, pairs, scale, -1.0)
    return _unflatten(flat)
