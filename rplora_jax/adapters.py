"""Adapter utilities: train only the LoRA factors, fold them in, save/load them, count them.

Everything here finds the factors with the same pairing as the preconditioner
(:func:`rplora_jax.find_lora_pairs`), so whatever ``scaled_adamw`` preconditions is exactly what
these functions treat as "the adapter". Leaves are addressed by their ``/``-joined path tokens,
e.g. ``"params/block_0/attn/query/lora_a"``.

File format: adapters are saved with **safetensors**, not orbax-checkpoint. An adapter is a flat,
small set of named tensors, which is what safetensors stores: one file, no pickle (safe to load
from untrusted sources), zero-copy reads, string metadata for the LoRA options, exact bytes for
every dtype including bfloat16, and files other ecosystems (PEFT, ``safetensors`` in PyTorch)
read directly. orbax-checkpoint targets large sharded training state (directories, async,
multi-host) and would add that machinery for a file of a few megabytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from rplora_jax._common import fold_delta
from rplora_jax.pairing import RuleSpec, find_lora_pairs, path_tokens

Scale = float | Callable[[str], float]

TRAINABLE = "lora"
FROZEN = "frozen"


def _leaf_paths(tree: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(path_tokens(p)) for p, _ in flat]


def factor_paths(tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None) -> set[str]:
    """Paths of every LoRA factor (``a`` and ``b``) the pairing finds in ``tree``."""
    pairs = find_lora_pairs(tree, rules=rules)
    return {p.a_path for p in pairs} | {p.b_path for p in pairs}


def lora_labels(tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None) -> Any:
    """Labels every leaf ``"lora"`` (a LoRA factor) or ``"frozen"``, for ``optax.partition``.

    Args:
      tree: parameters (any pytree: linen variables, ``nnx.State``...).
      rules: pairing rules, as for :func:`rplora_jax.find_lora_pairs`.

    Returns:
      A tree of the same structure holding the label strings.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> lora_labels(params)
      {'kernel': 'frozen', 'lora_a': 'lora', 'lora_b': 'lora'}
    """
    factors = factor_paths(tree, rules=rules)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: TRAINABLE if "/".join(path_tokens(p)) in factors else FROZEN, tree
    )


def trainable_mask(tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None) -> Any:
    """``True`` on LoRA factors, ``False`` elsewhere (for ``optax.masked`` and friends)."""
    factors = factor_paths(tree, rules=rules)
    return jax.tree_util.tree_map_with_path(lambda p, _: "/".join(path_tokens(p)) in factors, tree)


def freeze_base(
    tx: optax.GradientTransformation,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
) -> optax.GradientTransformation:
    """Wraps ``tx`` so only the LoRA factors train; every other leaf gets a zero update.

    ``optax.partition`` routes the factors to ``tx`` and the rest to ``optax.set_to_zero()``, so
    ``tx`` keeps no state (Adam moments...) for the frozen base. Both factors of a pair always land
    in the same branch, as the preconditioner needs. NNX users can equally pass
    ``wrt=nnx.LoRAParam`` to ``nnx.Optimizer``.

    Args:
      tx: any optimizer, e.g. :func:`rplora_jax.scaled_adamw`.
      rules: pairing rules, as for :func:`rplora_jax.find_lora_pairs`.

    Returns:
      An ``optax.GradientTransformation`` (its ``update`` needs ``params``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> params = {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> tx = freeze_base(rplora_jax.scaled_adamw(1e-2))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> float(jnp.abs(updates["kernel"]).max())
      0.0
    """
    return optax.partition(
        {TRAINABLE: tx, FROZEN: optax.set_to_zero()},
        lambda params: lora_labels(params, rules=rules),
    )


class ParamCount(NamedTuple):
    """Parameter counts: ``trainable`` (LoRA factors), ``total`` (all), ``percent``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _as_tree(tree: Any) -> Any:
    return nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree


def count_parameters(
    tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> ParamCount:
    """Counts the LoRA factors' and all parameters' elements.

    Args:
      tree: parameters, or an ``nnx.Module`` (its ``nnx.Param`` state is counted).
      rules: pairing rules, as for :func:`rplora_jax.find_lora_pairs`.

    Returns:
      A :class:`ParamCount`.
    """
    tree = _as_tree(tree)
    factors = factor_paths(tree, rules=rules)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    total = trainable = 0
    for p, leaf in flat:
        n = int(np.prod(np.shape(leaf)))
        total += n
        if "/".join(path_tokens(p)) in factors:
            trainable += n
    return ParamCount(trainable, total)


def print_trainable_parameters(
    tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> ParamCount:
    """Prints counts in PEFT's ``print_trainable_parameters`` format and returns them.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((6, 6)), "lora_a": jnp.zeros((6, 1)),
      ...           "lora_b": jnp.zeros((1, 6))}
      >>> _ = print_trainable_parameters(params)
      trainable params: 12 || all params: 48 || trainable%: 25.0000
    """
    count = count_parameters(tree, rules=rules)
    print(
        f"trainable params: {count.trainable:,} || all params: {count.total:,} || "
        f"trainable%: {count.percent:.4f}"
    )
    return count


# --- merge / unmerge ------------------------------------------------------------------------


def _flatten(params: Any) -> tuple[dict[tuple, Any], dict[str, tuple]]:
    """Flat dict of a nested mapping, plus a map from pairing paths to its keys."""
    if not isinstance(params, Mapping):
        raise ValueError(
            "merge/unmerge work on nested dicts of parameters (linen variables, or "
            f"nnx.to_pure_dict(state)); got {type(params).__name__}. For an NNX model use "
            "rplora_jax.nnx.merge(model)."
        )
    flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze") else params)
    index = {
        "/".join(path_tokens(tuple(jax.tree_util.DictKey(k) for k in key))): key for key in flat
    }
    return flat, index


def _kernel_key(a_path: str, index: dict[str, tuple]) -> tuple:
    tokens = a_path.split("/")
    if tokens[-1] != "lora_a":
        raise ValueError(
            f"merge: cannot tell which kernel the factor '{a_path}' belongs to; merge supports "
            "factors named lora_a/lora_b next to a 'kernel' (this library, nnx.LoRALinear)."
        )
    candidates = ["/".join([*tokens[:-1], "kernel"])]
    if len(tokens) >= 2 and tokens[-2] == "lora":  # nnx.LoRALinear: <layer>/lora/lora_a
        candidates.append("/".join([*tokens[:-2], "kernel"]))
    for c in candidates:
        if c in index:
            return index[c]
    raise ValueError(
        f"merge: no kernel found for the LoRA factor '{a_path}' (looked at {candidates})."
    )


def _scale_of(scale: Scale, a_path: str) -> float:
    return float(scale(a_path)) if callable(scale) else float(scale)


def _fold(flat, index, pairs, scale: Scale, sign: float) -> None:
    for pair in pairs:
        kkey = _kernel_key(pair.a_path, index)
        a, b = flat[index[pair.a_path]], flat[index[pair.b_path]]
        kernel = flat[kkey]
        delta = fold_delta(jnp.asarray(a), jnp.asarray(b), len(pair.stacked_shape))
        if delta.shape != np.shape(kernel):
            raise ValueError(
                f"merge: a @ b of '{pair.a_path}' has shape {delta.shape}, but its kernel "
                f"'{'/'.join(map(str, kkey))}' has shape {np.shape(kernel)}."
            )
        s = sign * _scale_of(scale, pair.a_path)
        kernel = jnp.asarray(kernel)
        flat[kkey] = (kernel.astype(delta.dtype) + s * delta).astype(kernel.dtype)


def merge(
    params: Any,
    scale: Scale = 1.0,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    keep_factors: bool = False,
) -> dict:
    """Folds ``s * a @ b`` into each kernel: ``kernel <- kernel + s * a @ b``.

    Without ``keep_factors`` the factors are removed, so the result is exactly the variables of
    the model *without* LoRA (e.g. the original model of :func:`rplora_jax.inject.inject_linen`)
    and serves at its cost. ``params`` itself is not changed: keep it to continue training, or
    use :func:`unmerge`. The fold runs in float32 (or wider) and is cast to the kernel's dtype.

    Args:
      params: nested dict of parameters / variables with the factors.
      scale: the LoRA scale ``s`` (``alpha / r``), or a callable ``a_path -> s``.
      rules: pairing rules, as for :func:`rplora_jax.find_lora_pairs`.
      keep_factors: keep the factors in the result (then zero ``lora_b`` yourself before using
        it with a LoRA model, or the term is counted twice).

    Returns:
      The merged nested dict.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...           "lora_b": jnp.ones((1, 2))}
      >>> merged = merge(params, scale=0.5)
      >>> sorted(merged), merged["kernel"].tolist()
      (['kernel'], [[0.5, 0.5], [0.5, 0.5]])
    """
    flat, index = _flatten(params)
    pairs = find_lora_pairs(params, rules=rules)
    _fold(flat, index, pairs, scale, 1.0)
    if not keep_factors:
        for pair in pairs:
            del flat[index[pair.a_path]], flat[index[pair.b_path]]
    return traverse_util.unflatten_dict(flat)


def unmerge(
    merged: Any,
    adapter: Mapping[str, Any],
    scale: Scale = 1.0,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
) -> dict:
    """Undoes :func:`merge`: puts the factors back and subtracts ``s * a @ b`` from each kernel.

    The kernels come back up to float rounding (one add and one subtract); keep the unmerged
    parameters if you need them bit-exact.

    Args:
      merged: merged nested dict (factors removed).
      adapter: the factors, as returned by :func:`extract_adapter` / :func:`load_adapter`.
      scale: the LoRA scale, or a callable ``a_path -> s``.
      rules: pairing rules.

    Returns:
      The nested dict with factors and base kernels.
    """
    flat, _ = _flatten(merged)
    for path, value in adapter.items():
        flat[tuple(path.split("/"))] = value
    params = traverse_util.unflatten_dict(flat)
    flat, index = _flatten(params)
    _fold(flat, index, find_lora_pairs(params, rules=rules), scale, -1.0)
    return traverse_util.unflatten_dict(flat)


# --- adapter extraction, save and load ------------------------------------------------------


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
    tree = _as_tree(tree)
    factors = factor_paths(tree, rules=rules)
    if not factors:
        raise ValueError("extract_adapter: no LoRA factors found in the tree.")
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        path: leaf
        for path, leaf in (("/".join(path_tokens(p)), leaf) for p, leaf in flat)
        if path in factors
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
      adapter: ``{path: array}`` from :func:`extract_adapter` / :func:`load_adapter`.
      rules: pairing rules.

    Returns:
      The updated tree (for NNX: ``nnx.update(model, apply_adapter(state, adapter))``).
    """
    factors = factor_paths(tree, rules=rules)
    missing = sorted(factors - adapter.keys())
    unexpected = sorted(adapter.keys() - factors)
    if missing or unexpected:
        raise ValueError(
            f"apply_adapter: adapter does not fit the parameters. Factors without a value: "
            f"{missing}; adapter entries with no such factor: {unexpected}."
        )

    def replace(p, leaf):
        path = "/".join(path_tokens(p))
        if path not in factors:
            return leaf
        new = adapter[path]
        if np.shape(new) != np.shape(leaf) or jnp.result_type(new) != jnp.result_type(leaf):
            raise ValueError(
                f"apply_adapter: '{path}' is {jnp.result_type(new)}{list(np.shape(new))} in the "
                f"adapter but {jnp.result_type(leaf)}{list(np.shape(leaf))} in the parameters."
            )
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
        :func:`extract_adapter`.
      metadata: strings to store with it (rank, alpha, targets...).
      rules: pairing rules.

    Returns:
      The saved ``{path: array}`` dict.

    Example:
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


def load_adapter(file: str, into: Any = None, *, rules=None) -> Any:
    """Loads an adapter saved by :func:`save_adapter`.

    Args:
      file: the safetensors file.
      into: optional parameters to load it into (see :func:`apply_adapter`).
      rules: pairing rules, used with ``into``.

    Returns:
      ``{path: array}``, or ``into`` with its factors replaced when ``into`` is given.
    """
    from safetensors.flax import load_file

    adapter = load_file(file)
    return adapter if into is None else apply_adapter(into, adapter, rules=rules)


def read_adapter_metadata(file: str) -> dict[str, str]:
    """The string metadata stored by :func:`save_adapter`."""
    from safetensors import safe_open

    with safe_open(file, framework="flax") as f:
        return dict(f.metadata() or {})
