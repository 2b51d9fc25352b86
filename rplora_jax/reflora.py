"""RefLoRA (Zhang, Li & Giannakis, NeurIPS 2025): gradients refactored by a geometric mean.

A LoRA pair ``a @ b`` can be refactored as ``(a @ P) @ (inv(P) @ b)`` without changing the
model. RefLoRA picks, at every step, the ``P`` with ``P @ P.T = S``, ``S = inv(a.T a) # (b b.T)``
(the matrix geometric mean), which balances the two factors, and a gradient step taken on the
refactored pair amounts to preconditioning the gradients::

    g_a <- g_a @ inv(S)        g_b <- S @ g_b        S @ (a.T @ a) @ S = b @ b.T

This is what the authors' released code does before AdamW (their ``Refactorer`` in its default
matrix mode), and what ``reflora_preconditioner`` does, stateless but for a step count, so it
composes with any optax optimizer like ``riemannian_preconditioner``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rplora_jax import _grouping, _linalg, _pairwise
from rplora_jax.pairing import RuleSpec


class RefLoRAState(NamedTuple):
    """State of [`reflora_preconditioner`][rplora_jax.reflora.reflora_preconditioner]: the
    number of updates so far (for ``warmup_steps`` and ``interval``); nothing per parameter."""

    count: jax.Array


def _refactor(a, b, g_a, g_b, *, eps, kind: _grouping.Kind, tuning: _grouping.Tuning):
    """RefLoRA's rule for ``n`` pairs of one kind: ``g_a @ inv(S)`` and ``S @ g_b``."""
    ata = _grouping.grams(a, kind.a_rank_axis, kind, tuning)  # (n, *stack, r, r)
    bbt = _grouping.grams(b, kind.b_rank_axis, kind, tuning)
    ata = jax.lax.psum(ata, kind.a_sum) if kind.a_sum else ata
    bbt = jax.lax.psum(bbt, kind.b_sum) if kind.b_sum else bbt
    # The authors' eps: the machine epsilon of the factors' dtype.
    eps = jnp.finfo(jnp.result_type(a[0])).eps if eps is None else eps
    s, s_inv = _linalg.geometric_mean_factors(ata, bbt, jnp.asarray(eps, kind.dtype))
    new_g_a = [
        _grouping.apply(g, s_inv[i], kind.a_rank_axis, kind, tuning) for i, g in enumerate(g_a)
    ]
    new_g_b = [_grouping.apply(g, s[i], kind.b_rank_axis, kind, tuning) for i, g in enumerate(g_b)]
    return new_g_a, new_g_b


def reflora_preconditioner(
    eps: float | None = None,
    *,
    warmup_steps: int = 0,
    interval: int = 1,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    allow_no_pairs: bool = False,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """Preconditions each LoRA pair's gradients as RefLoRA's refactoring does.

    For ``y = x @ (W0 + s * a @ b)`` with ``a: (in, r)`` and ``b: (r, out)``, with the
    matrix geometric mean ``S = inv(a.T @ a) # (b @ b.T)`` (``S @ a.T a @ S = b b.T``)::

        g_a <- g_a @ inv(S)        g_b <- S @ g_b

    Put it first in a chain ([`reflora_adamw`][rplora_jax.reflora.reflora_adamw] is the AdamW
    version, the authors' setting).
    Pairs are found by path as for ``riemannian_preconditioner``; every other leaf passes
    through unchanged. The ``r x r`` algebra runs in float32 (or float64) and each result is
    cast back to its gradient's dtype. Differences from the authors' code (``Refactorer`` with
    ``use_scalar=False``), each for finite results:

    - A pair whose ``a.T a`` or ``b b.T`` is numerically singular gets the identity: an
      eigenvalue of ``a.T a`` at most ``r`` float32 eps times its largest, or ``b b.T`` judged
      the same way through the refactoring's second Gram (whose conditioning is at most the
      product of the two). The authors' code gives ``S = 0`` when ``b = 0`` (LoRA's
      initialisation), so ``b`` never moves; they avoid that with ``warmup_steps`` or by
      re-initialising ``b``. Here LoRA starts as usual: plain gradients until ``b`` has full
      rank.
    - Eigenvalues that rounding makes slightly negative are taken as 0; the authors' code
      takes their square root (NaN).
    - The scalar variant (RefLoRA-S, ``use_scalar=True``), which rescales the factors and the
      AdamW moments after each step, is not offered: it changes parameters, not gradients.

    Args:
      eps: added to the singular values inverted in ``S`` and ``inv(S)``; ``None``: the
        machine epsilon of the factors' dtype, as in the authors' code.
      warmup_steps: the first ``warmup_steps`` updates pass the gradients through unchanged
        (the authors' default is 0; their scripts use 100 or 200).
      interval: after the warmup, precondition one update in every ``interval`` (the others
        pass through), as the authors' ``interval``.
      rules: as in
        [`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner].
      stacked_axes: as in ``riemannian_preconditioner``.
      allow_no_pairs: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``: inside ``shard_map``, the Grams are
        summed over the axes that split the factors' feature axes.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its state is a
      [`RefLoRAState`][rplora_jax.reflora.RefLoRAState].

    References:
      Zhang, Li & Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient
      Fine-Tuning of Large Models", NeurIPS 2025, https://arxiv.org/abs/2505.18877

    Examples:
      With ``a.T @ a = diag(1, 4)`` and ``b @ b.T = diag(4, 1)``, ``S = diag(2, 1/2)``:

      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (in=3, r=2)
      >>> b = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (r=2, out=3)
      >>> params = {"lora_a": a, "lora_b": b}
      >>> tx = rplora_jax.reflora_preconditioner(eps=0.0)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["lora_a"][0].round(4).tolist()  # g_a @ inv(S)
      [0.5, 2.0]
      >>> updates["lora_b"][:, 0].round(4).tolist()  # S @ g_b
      [2.0, 0.5]
    """
    for name, value, least in (("warmup_steps", warmup_steps, 0), ("interval", interval, 1)):
        # Under optax.inject_hyperparams both arrive as (traced) integer arrays.
        is_int = isinstance(value, int) or jnp.issubdtype(jnp.result_type(value), jnp.integer)
        # A concrete value is range-checked too; a traced one only by its type.
        too_small = isinstance(value, (int, np.integer)) and value < least
        if isinstance(value, bool) or not is_int or np.ndim(value) != 0 or too_small:
            raise ValueError(
                f"reflora_preconditioner: {name} must be an int >= {least}, got {value!r}."
            )
    setup = _pairwise.setup(
        "reflora_preconditioner",
        rules=rules,
        stacked_axes=stacked_axes,
        allow_no_pairs=allow_no_pairs,
        axis_name=axis_name,
        specs=specs,
    )
    inner = _pairwise.transformation(
        setup, functools.partial(_refactor, eps=eps), _grouping.DEFAULT
    )

    def init_fn(params):
        inner.init(params)
        return RefLoRAState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        new, _ = inner.update(updates, optax.EmptyState(), params)
        if not (isinstance(warmup_steps, int) and isinstance(interval, int)) or (
            warmup_steps or interval > 1
        ):
            since = state.count - warmup_steps
            on = (since >= 0) & (since % interval == 0)
            new = jax.tree.map(lambda x, g: jnp.where(on, x, g), new, updates)
        return new, RefLoRAState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def reflora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    refactor_eps: float | None = None,
    warmup_steps: int = 0,
    interval: int = 1,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    allow_no_pairs: bool = False,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """RefLoRA with AdamW: ``reflora_preconditioner`` followed by ``optax.adamw``.

    The authors' setting: their ``Refactorer`` preconditions the gradients, then PyTorch's AdamW
    steps (its decoupled weight decay is ``optax.adamw``'s; the authors' runs use
    ``weight_decay=0``).

    Args:
      learning_rate: a float or an optax schedule.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay, as in ``optax.adamw``.
      mask: weight-decay mask, as in ``optax.adamw``.
      refactor_eps: ``reflora_preconditioner``'s ``eps``.
      warmup_steps: as in ``reflora_preconditioner``.
      interval: as in ``reflora_preconditioner``.
      rules: as in ``riemannian_preconditioner``.
      stacked_axes: as in ``riemannian_preconditioner``.
      allow_no_pairs: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Zhang, Li & Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient
      Fine-Tuning of Large Models", NeurIPS 2025, https://arxiv.org/abs/2505.18877

    Examples:
      >>> import jax, jax.numpy as jnp, rplora_jax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = rplora_jax.reflora_adamw(1e-3)
      >>> updates, state = tx.update(params, tx.init(params), params)
    """
    return optax.chain(
        reflora_preconditioner(
            refactor_eps,
            warmup_steps=warmup_steps,
            interval=interval,
            rules=rules,
            stacked_axes=stacked_axes,
            allow_no_pairs=allow_no_pairs,
            axis_name=axis_name,
            specs=specs,
        ),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
