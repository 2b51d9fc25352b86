"""How the preconditioner groups its pairs, and which form of each operation it takes.

Every performance knob is here. Pairs of one *kind* (shapes, layout, stacked axes, dtypes,
sharding types and summed mesh axes alike) are cut into chunks whose Grams are inverted by one
batched call; the products stay per leaf, so that XLA fuses them into the next optimizer's
kernels. The values and forms were chosen by measurement on CPU (``docs/performance.md``, "What
the preconditioner does"); ``benchmarks/update_overhead.py --ab`` times each alternative form on
the backend it runs on. They are the same on every backend but the inverse's, a workaround.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rplora_jax import _linalg, _mesh


class Tuning(NamedTuple):
    """The preconditioner's performance choices; none changes its result beyond rounding."""

    # Large gradients (>= unroll_min_size elements, rank <= unroll_max_rank) whose rank axis is
    # not the last: a dot, or r multiply-adds fused into the next optimizer's kernels.
    rank_first_apply: Literal["matmul", "unrolled"] = "matmul"
    # Factors of >= stack_max_size elements: a Gram dot each, or one dot over them stacked.
    large_grams: Literal["separate", "stacked"] = "separate"
    # None: Gauss-Jordan on CPU, Cholesky elsewhere (see `inverse`).
    inverse: Literal["gauss_jordan", "cholesky"] | None = None
    unroll_max_rank: int = 32  # above it every apply is a dot, whose HLO does not grow with r
    unroll_min_size: int = 4096  # below it the apply is one broadcast product summed over r
    stack_max_size: int = 4096  # below it Grams are one batched dot
    chunk: int = 32  # pairs per batched inverse: fewer make more loops, more make more slices
    unrolled_chunk: int = 8  # the same for pairs with large per-leaf kernels


DEFAULT = Tuning()
_INVERSES = {"gauss_jordan": _linalg.gauss_jordan_inverse, "cholesky": _linalg.cholesky_inverse}


class Kind(NamedTuple):
    """What the pairs of one chunk share, besides their shapes and dtypes."""

    a_rank_axis: int
    b_rank_axis: int
    stacked: int
    dtype: Any  # the compute dtype of their r x r algebra
    b_sum: tuple[str, ...]  # the manual mesh axes to sum b's Grams over (a's gradient)
    a_sum: tuple[str, ...]


def chunks(pairs, p_leaves, g_leaves, sum_axes, tuning: Tuning) -> Iterator[tuple[list, Kind]]:
    """The pairs, grouped by kind and cut into chunks, each with its ``Kind``."""
    kinds: dict[Any, list[Any]] = {}
    for pair in pairs:
        leaves = [src[i] for src in (p_leaves, g_leaves) for i in (pair.a_index, pair.b_index)]
        types = tuple(
            (np.shape(x), jnp.result_type(x), _mesh.varying(x), _mesh.sharding_type(x))
            for x in leaves
        )
        dtype = _linalg.compute_dtype(*(t[1] for t in types))
        kind = Kind(
            pair.a_rank_axis, pair.b_rank_axis, pair.stacked, dtype, *sum_axes(pair, p_leaves)
        )
        kinds.setdefault((kind, types), []).append(pair)
    for (kind, _), same in kinds.items():
        first = same[0]
        large = any(
            _large_kernel(np.shape(g_leaves[i]), axis, tuning)
            for i, axis in ((first.a_index, kind.a_rank_axis), (first.b_index, kind.b_rank_axis))
        )
        size = tuning.unrolled_chunk if large else tuning.chunk
        for c in range(0, len(same), size):
            yield same[c : c + size], kind


def _large_kernel(shape, rank_axis: int, tuning: Tuning) -> bool:
    """Whether the apply of such a gradient is a large per-leaf kernel (unrolled, or a dot for
    the rank-first ones): XLA compiles one per distinct offset in the chunk's inverses."""
    return shape[rank_axis] <= tuning.unroll_max_rank and np.prod(shape) >= tuning.unroll_min_size


def grams(factors: list, rank_axis: int, kind: Kind, tuning: Tuning) -> jax.Array:
    """``(n, *stack, r, r)`` Grams of a chunk's ``n`` factors on one side."""
    k = kind.stacked
    stacked = len(factors) > 1 and (
        np.size(factors[0]) < tuning.stack_max_size or tuning.large_grams == "stacked"
    )
    if stacked:  # one batched dot over the factors stacked on a new leading axis
        x = jnp.stack(factors)
        return _linalg.gram(x, rank_axis + 1, k + 1, kind.dtype, _mesh.gram_sharding(x, k + 1))
    return jnp.stack(
        [_linalg.gram(f, rank_axis, k, kind.dtype, _mesh.gram_sharding(f, k)) for f in factors]
    )


def inverse(grams: jax.Array, reg: Any, tuning: Tuning) -> jax.Array:
    """``inv(grams + reg * I)``, batched, the identity where singular."""
    if tuning.inverse is not None:
        form = _INVERSES[tuning.inverse]
    else:
        # The only backend switch, a correctness workaround: LAPACK's batched Cholesky in
        # jaxlib 0.10.0 to 0.10.2 can hang on CPU (docs/numerics.md), so the CPU never calls it.
        form = functools.partial(
            jax.lax.platform_dependent,
            cpu=_linalg.gauss_jordan_inverse,
            default=_linalg.cholesky_inverse,
        )
    invert = functools.partial(_linalg.regularised_inverse, reg=reg, inverse=form)
    return _mesh.replicated(invert, grams)


def apply(g: jax.Array, inv: jax.Array, rank_axis: int, kind: Kind, tuning: Tuning) -> jax.Array:
    """``g`` with its rank axis multiplied by the symmetric ``inv``, in g's dtype and sharding."""
    r, size = g.shape[rank_axis], np.size(g)
    if r > tuning.unroll_max_rank:
        form = "matmul"
    elif size < tuning.unroll_min_size:
        form = "summed"
    elif rank_axis == g.ndim - 1:
        form = "unrolled"
    else:
        form = tuning.rank_first_apply
    fn = {
        "matmul": _linalg.apply_matmul,
        "summed": _linalg.apply_summed,
        "unrolled": _linalg.apply_unrolled,
    }[form]
    product = lambda x: _linalg.cast_back(
        fn(x.astype(kind.dtype), inv, rank_axis, kind.stacked), x.dtype
    )
    return _mesh.keep_sharding(g, rank_axis, product)
