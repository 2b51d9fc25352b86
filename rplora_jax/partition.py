"""Training only the LoRA factors: labels and masks for optax, ``freeze_base``, parameter counts.

Everything here finds the factors with the same pairing as the preconditioner
([`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]), so whatever ``scaled_adamw``
preconditions is exactly what these functions treat as trainable. Leaves are addressed by their
``/``-joined path tokens, e.g. ``"params/block_0/attn/query/lora_a"``. Needs only JAX and Optax.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from rplora_jax._trees import as_param_tree, path_str
from rplora_jax.pairing import RuleSpec, _factor_paths, _no_pairs_error

_TRAINABLE = "lora"
_FROZEN = "frozen"


def _patterns(also_train: str | Sequence[str] | None) -> list[str]:
    """``also_train`` as a list of regexes, checked (so a bad value fails where it is given)."""
    if also_train is None:
        return []
    patterns = [also_train] if isinstance(also_train, str) else also_train
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"also_train must be a regex or a list of regexes, got {also_train!r}.")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"also_train: invalid regular expression {p!r}: {err}") from err
    return list(patterns)


def _trainable_paths(tree, rules, also_train, require_pairs: str | None = None) -> set[str]:
    """The factors' and ``also_train``'s paths; ``require_pairs``: the caller, for which a tree
    with nothing to train (no factors, no ``also_train``) is an error."""
    factors = _factor_paths(tree, rules=rules)
    patterns = _patterns(also_train)
    if require_pairs and not factors and not patterns:
        raise _no_pairs_error(tree, require_pairs, hint="")
    if not patterns:
        return factors
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    extra = {q for q in paths if any(re.fullmatch(p, q) for p in patterns)}
    unmatched = [p for p in patterns if not any(re.fullmatch(p, q) for q in paths)]
    if unmatched:
        raise ValueError(
            f"also_train patterns {unmatched} match no leaf; they must match a whole '/'-joined "
            f"leaf path such as {paths[:3]}."
        )
    return factors | extra


def lora_labels(
    tree: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    also_train: str | Sequence[str] | None = None,
) -> Any:
    """Labels every leaf ``"lora"`` (trained) or ``"frozen"``, for ``optax.partition``.

    Args:
      tree: parameters (any pytree: linen variables, ``nnx.State``...).
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].
      also_train: regex (or list) of further leaves to train, matching the whole ``/``-joined
        leaf path, e.g. ``r"params/classifier/.*"`` for a new head (PEFT's
        ``modules_to_save``).

    Returns:
      A tree of the same structure holding the label strings.

    Raises:
      ValueError: when the rules find no LoRA pair and ``also_train`` is not given, which would
        label every leaf ``"frozen"`` and train nothing.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> lora_labels(params)
      {'kernel': 'frozen', 'lora_a': 'lora', 'lora_b': 'lora'}
    """
    return _labels(tree, _trainable_paths(tree, rules, also_train, "lora_labels"))


def _labels(tree: Any, trained: set[str]) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _TRAINABLE if path_str(p) in trained else _FROZEN, tree
    )


def trainable_mask(
    tree: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    also_train: str | Sequence[str] | None = None,
) -> Any:
    """``True`` where [`lora_labels`][rplora_jax.partition.lora_labels] says ``"lora"`` (for
    ``optax.masked`` and friends)."""
    trained = _trainable_paths(tree, rules, also_train, "trainable_mask")
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in trained, tree)


def freeze_base(
    tx: optax.GradientTransformation,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    also_train: str | Sequence[str] | None = None,
) -> optax.GradientTransformation:
    """Wraps ``tx`` so only the LoRA factors (and ``also_train``) train; the rest gets zero.

    ``optax.partition`` routes the factors to ``tx`` and every other leaf to
    ``optax.set_to_zero()``, so ``tx`` keeps no state (Adam moments...) for the frozen base, and
    under ``jax.jit`` the base's gradients are dead code that XLA removes. Both factors of a pair
    always land in the same branch, as the preconditioner needs. NNX users can equally pass
    ``wrt=nnx.LoRAParam`` to ``nnx.Optimizer``.

    Args:
      tx: any optimizer, e.g. [`scaled_adamw`][rplora_jax.preconditioner.scaled_adamw].
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].
      also_train: regex (or list) of further leaves to train with ``tx``, matching the whole
        ``/``-joined leaf path (e.g. a classification head, ``r"params/classifier/.*"``). A
        pattern that matches no leaf is an error.

    Returns:
      An ``optax.GradientTransformation`` (its ``update`` needs ``params``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> params = {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> tx = freeze_base(rplora_jax.scaled_sgd(0.1, reg=0.0))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> float(jnp.abs(updates["kernel"]).max())
      0.0
      >>> [round(float(u), 4) for u in updates["lora_a"][0]]  # b = 0: identity preconditioner
      [-0.1, -0.1]
    """
    _patterns(also_train)

    def labels(params):
        # Without factors every update would be zero (or, for a pairing optimizer, an error
        # naming no path, since its branch is all masked): say so, naming the tree's paths.
        return _labels(params, _trainable_paths(params, rules, also_train, "freeze_base"))

    return optax.partition({_TRAINABLE: tx, _FROZEN: optax.set_to_zero()}, labels)


class ParamCount(NamedTuple):
    """Parameter counts: ``trainable`` (LoRA factors), ``total`` (all), ``percent``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(
    tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> ParamCount:
    """Counts the LoRA factors' and all parameters' elements.

    Args:
      tree: parameters, or an ``nnx.Module`` (its ``nnx.Param`` state is counted).
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].

    Returns:
      A [`ParamCount`][rplora_jax.partition.ParamCount].

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((6, 6)), "lora_a": jnp.zeros((6, 1)),
      ...           "lora_b": jnp.zeros((1, 6))}
      >>> count = count_parameters(params)
      >>> count.trainable, count.total, count.percent
      (12, 48, 25.0)
    """
    tree = as_param_tree(tree)
    factors = _factor_paths(tree, rules=rules)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    total = trainable = 0
    for p, leaf in flat:
        n = int(np.prod(np.shape(leaf)))
        total += n
        if path_str(p) in factors:
            trainable += n
    return ParamCount(trainable, total)


def print_trainable_parameters(
    tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None
) -> ParamCount:
    """Prints counts in PEFT's ``print_trainable_parameters`` format and returns them.

    Examples:
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
