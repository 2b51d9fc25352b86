"""The Riemannian preconditioner for LoRA (Zhang & Pilanci, ICML 2024) as optax transformations.

``_precondition`` is the whole rule, for a chunk of pairs of one kind. What every optimizer over
LoRA pairs does around its rule is in ``_pairwise.py``; how pairs are grouped and which form
each operation takes in ``_grouping.py``, the linear algebra in ``_linalg.py``, meshes in
``_mesh.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rplora_jax import _grouping, _mesh, _pairwise
from rplora_jax.pairing import RuleSpec

DEFAULT_REG = 1e-2
"""The default ``reg``, PEFT's value; the paper's code uses 1e-6. LoRA starts with ``b = 0``, so
``b @ b.T + reg * I`` is tiny at first and its inverse scales ``g_a`` up by about ``1 / reg``:
with 1e-6 those first preconditioned gradients fill Adam's second moment and slow ``a`` down
for thousands of steps ([why 1e-2](numerics.md#why-reg1e-2-by-default))."""


def _precondition(a, b, g_a, g_b, *, reg, kind: _grouping.Kind, tuning: _grouping.Tuning):
    """The rule of Zhang & Pilanci for ``n`` pairs of one kind: lists of ``n`` factors and their
    gradients, returned preconditioned, each in its gradient's dtype and sharding::

        g_a <- g_a @ inv(b @ b.T + reg * I)        g_b <- inv(a.T @ a + reg * I) @ g_b
    """
    n = len(a)
    bbt = _grouping.grams(b, kind.b_rank_axis, kind, tuning)  # (n, *stack, r, r)
    ata = _grouping.grams(a, kind.a_rank_axis, kind, tuning)
    # Inside shard_map: summed over the manual axes that split the factors' feature axes.
    bbt = jax.lax.psum(bbt, kind.b_sum) if kind.b_sum else bbt
    ata = jax.lax.psum(ata, kind.a_sum) if kind.a_sum else ata
    # One batched inverse for both sides; the identity where a Gram is singular.
    inv = _grouping.inverse(jnp.concatenate(_mesh.same_sharding([bbt, ata])), reg, tuning)
    new_g_a = [
        _grouping.apply(g, inv[i], kind.a_rank_axis, kind, tuning) for i, g in enumerate(g_a)
    ]
    new_g_b = [
        _grouping.apply(g, inv[n + i], kind.b_rank_axis, kind, tuning) for i, g in enumerate(g_b)
    ]
    return new_g_a, new_g_b


def riemannian_preconditioner(
    reg: float | jax.Array = DEFAULT_REG,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    allow_no_pairs: bool = False,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    r"""Preconditions the gradients of every LoRA pair with its partner's ``r x r`` Gram.

    For ``y = x @ (W0 + s * a @ b)`` with ``a: (in, r)`` and ``b: (r, out)``::

        g_a <- g_a @ inv(b @ b.T + reg * I)        g_b <- inv(a.T @ a + reg * I) @ g_b

    This is the Riemannian preconditioner of Zhang & Pilanci (2024). Put it first in a chain:
    followed by ``optax.sgd`` it is *scaled GD*, by ``optax.adamw`` *scaled AdamW* (Adam's moments
    then see the preconditioned gradient). Pairs are found by path (see
    [how pairing works](pairing.md) and [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]);
    every other leaf passes through unchanged. Leading axes shared by both factors are
    independent stacked layers, each with its own Grams.

    The ``r x r`` algebra runs in float32 (float64 for float64 inputs) and each result is cast
    back to its gradient's dtype. A pair whose regularised Gram is singular in float32 (``b = 0``
    at initialisation with ``reg=0``, a rank-deficient factor; numerically: a pivot at most
    float32's eps times its largest diagonal entry) gets the identity instead, so no NaN/Inf is
    produced; float16 results saturate at float16's largest value rather than overflow. With
    ``reg=0`` a nearly rank-deficient factor can pass that test and scale its partner's gradient
    by up to ~1/eps: keep ``reg > 0``. No state is kept and nothing recompiles from step to step.

    Args:
      reg: ridge ``reg * I`` added to each Gram; a float, or an array (so
        ``optax.inject_hyperparams`` can schedule it). Defaults to PEFT's 1e-2 (see
        ``DEFAULT_REG`` for why); the paper's code uses 1e-6.
      rules: how LoRA factors are named and laid out; ``None`` for the defaults, which find
        ``nnx.LoRA``/``nnx.LoRALinear``, this library's layers, gemma's ``peft`` and qwix. See
        [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]. Under ``optax.inject_hyperparams``
        a bare match function must be in ``static_args`` (or wrapped in ``PairingRule``), or it is
        taken for a schedule.
      stacked_axes: number of leading stacked-layer axes; ``None`` infers it per pair.
      allow_no_pairs: if False (default), a tree with no LoRA pair is an error, since it almost
        always means misconfigured names.
      axis_name: inside ``shard_map``, the mesh axis (a str) or axes (a tuple/list of str)
        over which factors' feature axes may be sharded: each Gram is summed with ``psum`` over
        those of these axes its factor varies along (so replicated factors are not
        over-counted). A name that is not a mesh axis is an error, and so is ``check_vma=False``
        (or ``pmap``), which hides what a factor varies along. Name no axis that shards a
        stacked-layer or rank axis: inside shard_map its blocks look like a sharded feature
        axis's, and the Grams come out wrong; pass ``specs`` for such layouts. Leave it ``None``
        under ``jax.jit``, where XLA inserts that reduction itself, and under ``pmap`` or data
        parallelism, where factors are replicated.
      specs: inside ``shard_map``, instead of ``axis_name``: the parameters' ``PartitionSpec``
        tree (or a prefix of it), as given to ``shard_map``'s ``in_specs``. Each Gram is then
        summed over exactly the manual axes its factor's feature axes are sharded over: stacked
        layers sharded over a mesh axis stay separate, and a rank axis sharded over a manual axis
        is an error naming the factor. ``check_vma=False`` works, but then a spec that does not
        match the factor goes unnoticed (with ``check_vma=True`` it is an error). Under
        ``jax.jit`` it is not needed, and harmless (``nnx.Variable``-wrapped specs included).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    References:
      Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
      ICML 2024, https://arxiv.org/abs/2402.02347

    Examples:
      With ``a.T @ a = diag(1, 4)`` and ``b @ b.T = diag(4, 1)``, unit gradients are scaled
      row- and column-wise by the inverses:

      >>> import jax, jax.numpy as jnp, optax
      >>> import rplora_jax
      >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (in=3, r=2)
      >>> b = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # (r=2, out=4)
      >>> params = {"lora_a": a, "lora_b": b}
      >>> tx = rplora_jax.riemannian_preconditioner(reg=0.0)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["lora_a"].tolist()  # g_a @ inv(b b^T): columns scaled by 1/4 and 1
      [[0.25, 1.0], [0.25, 1.0], [0.25, 1.0]]
      >>> updates["lora_b"].tolist()  # inv(a^T a) @ g_b: rows scaled by 1 and 1/4
      [[1.0, 1.0, 1.0, 1.0], [0.25, 0.25, 0.25, 0.25]]

      Followed by ``optax.sgd`` this is scaled GD;
      [`scaled_adamw`][rplora_jax.preconditioner.scaled_adamw] is the AdamW version.
    """
    return _transformation(
        reg,
        rules=rules,
        stacked_axes=stacked_axes,
        allow_no_pairs=allow_no_pairs,
        axis_name=axis_name,
        specs=specs,
    )


def _transformation(
    reg=DEFAULT_REG,
    *,
    rules=None,
    stacked_axes=None,
    allow_no_pairs=False,
    axis_name=None,
    specs=None,
    tuning: _grouping.Tuning = _grouping.DEFAULT,
) -> optax.GradientTransformation:
    """``riemannian_preconditioner`` with its performance choices set by ``tuning``."""
    _check_reg(reg)
    setup = _pairwise.setup(
        "riemannian_preconditioner",
        rules=rules,
        stacked_axes=stacked_axes,
        allow_no_pairs=allow_no_pairs,
        axis_name=axis_name,
        specs=specs,
    )
    return _pairwise.transformation(setup, functools.partial(_precondition, reg=reg), tuning)


def _check_reg(reg) -> None:
    if callable(reg) or reg is None or isinstance(reg, bool) or not hasattr(reg, "__float__"):
        raise TypeError(
            f"reg must be a non-negative number or scalar array, got {reg!r}. To schedule it: "
            "optax.inject_hyperparams(rplora_jax.riemannian_preconditioner)(reg=schedule)."
        )
    if np.ndim(reg) != 0:
        raise ValueError(f"reg must be a scalar, got shape {np.shape(reg)}.")
    try:
        value = float(reg)
    except jax.errors.ConcretizationTypeError:  # traced (inject_hyperparams): checked as a scalar
        return
    if not value >= 0:
        raise ValueError(f"reg must be a non-negative number, got {reg!r}.")


def scaled_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    reg: float | jax.Array = DEFAULT_REG,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    allow_no_pairs: bool = False,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """Scaled GD: ``riemannian_preconditioner`` followed by ``optax.sgd``.

    Identical to ``optax.chain(riemannian_preconditioner(reg, ...), optax.sgd(learning_rate,
    momentum, nesterov))``; see
    [`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner]. Keyword
    arguments are explicit (no ``**kwargs``) so ``optax.inject_hyperparams(scaled_sgd)`` works
    (with ``static_args=("stacked_axes",)`` when ``stacked_axes`` is given).

    Args:
      learning_rate: a float or an optax schedule.
      momentum: heavy-ball momentum, or ``None``.
      nesterov: use Nesterov momentum.
      reg: as in ``riemannian_preconditioner``.
      rules: as in ``riemannian_preconditioner``.
      stacked_axes: as in ``riemannian_preconditioner``.
      allow_no_pairs: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
      ICML 2024, https://arxiv.org/abs/2402.02347

    Examples:
      >>> import jax.numpy as jnp, optax, rplora_jax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = rplora_jax.scaled_sgd(1e-2, momentum=0.9)
      >>> state = tx.init(params)
    """
    return optax.chain(
        riemannian_preconditioner(
            reg,
            rules=rules,
            stacked_axes=stacked_axes,
            allow_no_pairs=allow_no_pairs,
            axis_name=axis_name,
            specs=specs,
        ),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def scaled_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    reg: float | jax.Array = DEFAULT_REG,
    mask: Any = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    allow_no_pairs: bool = False,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """Scaled AdamW: ``riemannian_preconditioner`` followed by ``optax.adamw``.

    Identical to ``optax.chain(riemannian_preconditioner(reg, ...), optax.adamw(...))`` (see
    [`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner]): Adam's
    moments see the preconditioned gradient, as in the paper and its peers.

    Args:
      learning_rate: a float or an optax schedule.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay, as in ``optax.adamw``.
      reg: as in ``riemannian_preconditioner``.
      mask: weight-decay mask, as in ``optax.adamw``.
      rules: as in ``riemannian_preconditioner``.
      stacked_axes: as in ``riemannian_preconditioner``.
      allow_no_pairs: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
      ICML 2024, https://arxiv.org/abs/2402.02347

    Examples:
      >>> import jax, jax.numpy as jnp, rplora_jax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = rplora_jax.scaled_adamw(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
    """
    return optax.chain(
        riemannian_preconditioner(
            reg,
            rules=rules,
            stacked_axes=stacked_axes,
            allow_no_pairs=allow_no_pairs,
            axis_name=axis_name,
            specs=specs,
        ),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
