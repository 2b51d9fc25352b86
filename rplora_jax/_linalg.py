"""The preconditioner's linear algebra, on arrays only: Grams, regularised inverses, products.

Each function takes the factor or gradient, the position of its rank axis and its number of
leading stacked-layer axes, and works in the compute dtype it is given (float32 or wider). Which
form of each operation is used where is decided in `rplora_jax._grouping`; why, in the
performance page's "What the preconditioner does" (``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 when an input is (and x64 is on)."""
    wide = any(jnp.dtype(d).itemsize > 4 for d in dtypes)
    return jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32)


def gram(x: jax.Array, rank_axis: int, stacked: int, dtype, out_sharding: Any = None):
    """``(*stack, r, r)`` Gram of a factor: contracts every axis but the stack and the rank."""
    x = x.astype(dtype)
    batch = tuple(range(stacked))
    contract = tuple(i for i in range(stacked, x.ndim) if i != rank_axis)
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    dims = ((contract, contract), (batch, batch))
    return jax.lax.dot_general(
        x, x, dims, precision=HIGHEST, preferred_element_type=dtype, **kwargs
    )


def gauss_jordan_inverse(m: jax.Array, eye: jax.Array) -> jax.Array:
    """Inverse of SPD ``m`` by Gauss-Jordan without pivoting (stable for SPD), identity if singular.

    Step ``k``'s pivot is the ``k``-th Schur complement's leading entry, i.e. the square of the
    Cholesky factor's ``k``-th diagonal entry, so the singularity test matches
    `cholesky_inverse`'s. Any leading batch axes, none reshaped (they may be sharded).
    """
    r = m.shape[-1]
    idx = jnp.arange(r)
    scale = jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)

    def step(a, k):
        is_k = idx == k
        pivot = a[..., k, k]
        row = jnp.where(is_k, 1.0, a[..., k, :]) / pivot[..., None]
        col = jnp.where(is_k, 0.0, a[..., :, k])
        a = jnp.where(is_k[None, :], 0.0, a) - col[..., :, None] * row[..., None, :]
        a = jnp.where(is_k[:, None], row[..., None, :], a)
        return a, pivot

    # Pivots are scan outputs, not carried: under shard_map a carry must keep its varying axes.
    inv, pivots = jax.lax.scan(step, m, idx)
    # NaN pivots propagate through min and compare False, so they also select the identity.
    ok = jnp.min(pivots, axis=0) > jnp.finfo(m.dtype).eps * scale
    return jnp.where(ok[..., None, None], inv, eye)


def cholesky_inverse(m: jax.Array, eye: jax.Array) -> jax.Array:
    """Inverse of SPD ``m`` from its Cholesky factor (which reads the lower triangle only),
    identity if singular."""
    chol = jnp.linalg.cholesky(m)
    pivots = jnp.diagonal(chol, axis1=-2, axis2=-1)
    scale = jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)
    # NaN pivots (failed factorisation) compare False, so they also select the identity.
    ok = jnp.min(pivots, axis=-1) ** 2 > jnp.finfo(m.dtype).eps * scale
    linv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    inv = jnp.matmul(jnp.swapaxes(linv, -1, -2), linv, precision=HIGHEST)
    return jnp.where(ok[..., None, None], inv, eye)


def regularised_inverse(m: jax.Array, reg: Any, inverse) -> jax.Array:
    """Batched ``inv(m + reg*I)`` of PSD ``(..., r, r)`` matrices by ``inverse`` (one of the two
    above), the identity where singular, as the reference code falls back to when
    ``torch.inverse`` fails: LoRA starts with ``b = 0``, and users set ``reg=0``."""
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    return inverse(m + jnp.asarray(reg, m.dtype) * eye, eye)


def apply_unrolled(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int) -> jax.Array:
    """``inv`` along g's rank axis as ``r`` broadcast multiply-adds: elementwise, so fused into
    the next optimizer's kernels and never written out."""
    r = g.shape[rank_axis]
    # inv[..., k, :] laid out along g's axes: stacked axes first, r at the rank axis.
    row_shape = [*g.shape[:stacked]] + [1] * (g.ndim - stacked)
    row_shape[rank_axis] = r
    out = None
    for k in range(r):
        row = inv[..., k, :].reshape(row_shape)
        term = jax.lax.slice_in_dim(g, k, k + 1, axis=rank_axis) * row
        out = term if out is None else out + term
    return out


def apply_summed(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int) -> jax.Array:
    """``inv`` along g's rank axis as one broadcast product summed over it: a few HLO ops,
    whatever ``r`` is."""
    r = g.shape[rank_axis]
    gk = jnp.expand_dims(g, rank_axis + 1)
    shape = [*g.shape[:stacked]] + [1] * (g.ndim + 1 - stacked)
    shape[rank_axis], shape[rank_axis + 1] = r, r
    return jnp.sum(gk * inv.reshape(shape), axis=rank_axis)


def apply_matmul(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int) -> jax.Array:
    """``inv`` along g's rank axis as a dot, whose HLO does not grow with ``r``.

    Operands ordered so the result comes out in g's axis order; rank axis first: ``inv @ g``,
    contracting inv's last axis, the form XLA:CPU hands to YNNPACK (inv is symmetric).
    """
    batch = tuple(range(stacked))
    if rank_axis == stacked:
        dims = (((stacked + 1,), (rank_axis,)), (batch, batch))
        return jax.lax.dot_general(inv, g, dims, precision=HIGHEST, preferred_element_type=g.dtype)
    dims = (((rank_axis,), (stacked,)), (batch, batch))
    out = jax.lax.dot_general(g, inv, dims, precision=HIGHEST, preferred_element_type=g.dtype)
    return out if rank_axis == g.ndim - 1 else jnp.moveaxis(out, -1, rank_axis)


def cast_back(x: jax.Array, dtype) -> jax.Array:
    """``x`` in the gradient's dtype, saturating at its largest finite value where that is
    below the compute dtype's (float16): an inverse of a nearly singular Gram, which float32
    cannot always tell from a singular one when ``reg=0``, can scale a gradient past it."""
    big = float(jnp.finfo(dtype).max)  # a Python float: weakly typed, no dtype promotion
    if big < float(jnp.finfo(x.dtype).max):
        x = jnp.clip(x, -big, big)  # elementwise: fused into the next optimizer's kernel
    return x.astype(dtype)


def fold_delta(a: jax.Array, b: jax.Array, n_batch: int, precision=HIGHEST) -> jax.Array:
    """``a @ b`` over the rank axis, batched over ``n_batch`` leading axes, in float32 or wider.

    With ``a: (*batch, *in, r)`` and ``b: (*batch, r, *out)`` the result is
    ``(*batch, *in, *out)``: the kernel layout of every layer in this library.
    """
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    batch = tuple(range(n_batch))
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((a.ndim - 1,), (n_batch,)), (batch, batch)),
        precision=precision,
        preferred_element_type=dtype,
    )


def mm(x: jax.Array, y: jax.Array) -> jax.Array:
    """Batched ``x @ y`` in full precision on every backend."""
    return jnp.matmul(x, y, precision=HIGHEST)


def t(x: jax.Array) -> jax.Array:
    """Batched transpose of the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def sym(x: jax.Array) -> jax.Array:
    """The symmetric part of a batch of square matrices."""
    return (x + t(x)) / 2


def psd_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending, rounding's negatives clipped to 0) and eigenvectors of PSD ``m``."""
    w, v = jnp.linalg.eigh(sym(m))
    return jnp.maximum(w, 0.0), v


def geometric_mean_factors(ata: jax.Array, bbt: jax.Array, eps) -> tuple[jax.Array, jax.Array]:
    """``(S, inv(S))`` for ``S = inv(ata) # bbt``, the matrix geometric mean, which solves
    ``S @ ata @ S = bbt`` (RefLoRA's refactoring). As in the authors' code, from two eigen
    decompositions, with ``eps`` added to each singular value that is inverted; batched. Where
    either Gram is numerically singular (``b = 0`` in particular), both are the identity."""
    lam_a, v_a = psd_eigh(ata)
    s_a = jnp.sqrt(lam_a)
    # M^T M for M = b^T V_a diag(s_a): its eigenvectors and singular values.
    mtm = s_a[..., :, None] * mm(mm(t(v_a), bbt), v_a) * s_a[..., None, :]
    lam_m, v_m = psd_eigh(mtm)
    s_m = jnp.sqrt(lam_m)
    left = mm(v_a / (s_a[..., None, :] + eps), v_m)
    s = mm(left * s_m[..., None, :], t(left))
    right = mm(v_a * s_a[..., None, :], v_m)
    s_inv = mm(right / (s_m[..., None, :] + eps), t(right))
    # An eigenvalue at most r * eps of the largest is rounding noise in a float32 Gram. b b^T
    # is judged through M^T M, whose conditioning is at most a^T a's times b b^T's.
    tol = ata.shape[-1] * jnp.finfo(ata.dtype).eps
    ratio_a = lam_a[..., 0] / jnp.maximum(lam_a[..., -1], jnp.finfo(ata.dtype).tiny)
    singular = (ratio_a <= tol) | (lam_m[..., 0] <= tol * ratio_a * lam_m[..., -1])
    eye = jnp.broadcast_to(jnp.eye(ata.shape[-1], dtype=ata.dtype), ata.shape)
    pick = lambda x: jnp.where(singular[..., None, None], eye, x)
    return pick(s), pick(s_inv)
