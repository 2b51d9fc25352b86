"""LoRA+: AdamW with a larger learning rate for the ``b`` factors (Hayou et al., 2024).

A baseline to compare the Riemannian preconditioner against. The factors are found by the same
pairing as the preconditioner ([`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]), so whatever
[`scaled_adamw`][rplora_jax.preconditioner.scaled_adamw] preconditions is what LoRA+ splits into
``a`` and ``b``. Needs only JAX and Optax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from rplora_jax._trees import path_str
from rplora_jax.pairing import RuleSpec, _no_pairs_error, find_lora_pairs

_B_FACTOR = "lora_b"
_OTHER = "other"


def loraplus_labels(
    tree: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    allow_no_pairs: bool = False,
) -> Any:
    """Labels the ``b`` factor of every LoRA pair ``"lora_b"`` and every other leaf ``"other"``.

    Args:
      tree: parameters or updates (any pytree; ``optax.MaskedNode`` subtrees are kept).
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].
      allow_no_pairs: return all ``"other"`` for a tree without pairs instead of raising.

    Returns:
      A tree of the same structure holding the label strings.

    Raises:
      ValueError: a factor without its partner (naming its path), or no pairs at all unless
        ``allow_no_pairs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 2)),
      ...           "lora_b": jnp.zeros((2, 4))}
      >>> loraplus_labels(params)
      {'kernel': 'other', 'lora_a': 'other', 'lora_b': 'lora_b'}
    """
    pairs = find_lora_pairs(tree, rules=rules)
    if not pairs and not allow_no_pairs:
        raise _no_pairs_error(tree, "loraplus_adamw")
    b_paths = {p.b_path for p in pairs}
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _B_FACTOR if path_str(p) in b_paths else _OTHER, tree
    )


def _times(learning_rate: optax.ScalarOrSchedule, ratio: Any) -> optax.ScalarOrSchedule:
    if callable(learning_rate):
        return lambda count: learning_rate(count) * ratio
    return learning_rate * ratio


def loraplus_adamw(
    learning_rate: optax.ScalarOrSchedule,
    lr_ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformation:
    """LoRA+: AdamW whose LoRA ``b`` factors step with ``lr_ratio * learning_rate``.

    The ``b`` factor of each pair (the output side: ``b`` in Flax layout, ``lora_B`` in PyTorch
    layout, whichever the pairing rule says) gets learning rate ``lr_ratio * learning_rate``; the
    ``a`` factors and every other leaf get ``learning_rate``. Everything else is ``optax.adamw``:
    per leaf, the update equals that of ``optax.adamw`` at the leaf's rate, as in PEFT's
    ``create_loraplus_optimizer`` (without its separate rate for embedding layers). Built as
    ``optax.chain(optax.scale_by_adam(...), optax.add_decayed_weights(weight_decay, mask),
    optax.partition(...))`` with the partition choosing the rate by
    [`loraplus_labels`][rplora_jax.loraplus.loraplus_labels], so ``mask`` works exactly as in
    ``optax.adamw``. With ``lr_ratio=1`` it *is* ``optax.adamw``. Arguments are explicit (no
    ``**kwargs``) so ``optax.inject_hyperparams(loraplus_adamw)`` works, with ``learning_rate`` and
    ``lr_ratio`` as injected hyperparameters.

    Args:
      learning_rate: a float or an optax schedule; a schedule for the ``b`` factors is this
        schedule times ``lr_ratio``.
      lr_ratio: ratio of the ``b`` factors' rate to ``learning_rate`` (LoRA+'s lambda; PEFT's
        default 16).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay, as in ``optax.adamw`` (multiplied by each leaf's
        own learning rate).
      mask: weight-decay mask, as in ``optax.adamw``.
      rules: pairing rules, as for [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].
      allow_no_pairs: allow a tree without LoRA pairs (then this is plain AdamW) instead of
        raising.

    Returns:
      An ``optax.GradientTransformation``. ``init`` and ``update`` raise ``ValueError`` naming
      the path of a factor without its partner.

    References:
      Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
      https://arxiv.org/abs/2402.12354

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rplora_jax.loraplus import loraplus_adamw
      >>> params = {"kernel": jnp.ones((3, 3)),
      ...           "lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}
      >>> tx = loraplus_adamw(1e-2, lr_ratio=16.0, weight_decay=0.0)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> {k: round(float(u[0, 0]), 4) for k, u in updates.items()}  # Adam's first step: -lr
      {'kernel': -0.01, 'lora_a': -0.01, 'lora_b': -0.16}
    """
    labels = lambda tree: loraplus_labels(tree, rules=rules, allow_no_pairs=allow_no_pairs)
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.partition(
            {
                _OTHER: optax.scale_by_learning_rate(learning_rate),
                _B_FACTOR: optax.scale_by_learning_rate(_times(learning_rate, lr_ratio)),
            },
            labels,
        ),
    )
