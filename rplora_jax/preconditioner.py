"""The Riemannian preconditioner for LoRA (Zhang & Pilanci, ICML 2024) as optax transformations."""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rplora_jax.pairing import RuleSpec, match_pairs, no_pairs_error, path_str
from rplora_jax.partition import unwrap_variables

# PEFT's value. LoRA starts with b = 0, so b b^T + reg I is tiny at first and inv() scales g_a
# up by about 1/reg: with the reference code's 1e-6 those first huge preconditioned gradients
# fill Adam's second moment and slow `a` down for thousands of steps. On examples/quickstart.py,
# scaled AdamW at lr 3e-2 reached a loss of 2.9e-5 with reg=1e-2 against 6.3e-4 with 1e-6 (plain
# AdamW: 2.5e-4). Pass reg=1e-6 (or 0) to match the paper's code exactly.
DEFAULT_REG = 1e-2

_HIGHEST = jax.lax.Precision.HIGHEST
# _apply's three forms: a matmul above _UNROLL_MAX_RANK; below it, r unrolled multiply-adds for
# gradients of at least _UNROLL_MIN_SIZE elements whose rank axis is the last one (on CPU; on
# other backends whatever their rank axis), a matmul on CPU for such gradients whose rank axis is
# not, and one broadcast product summed over the rank for smaller ones. Both elementwise forms
# are fused into the next optimizer's elementwise kernels (no extra pass over the gradient, no dot
# call); the unrolled one is fastest on large gradients but adds ~8 HLO ops per rank to every
# leaf, and XLA's compile time grows with the module size.
# scaled_adamw on a 2-core CPU, update time per step (ratio to optax.adamw in the same run):
#                        unrolled       sum over rank   matmul
#   128 pairs 4096x16    37.1 ms (2.05)  69.0 ms (3.62)  47.6 ms (2.45)
#   48 pairs 1024x4      1.54 ms (1.61)  1.78 ms (1.79)  1.92 ms (1.78)
#   512 pairs 64x4       13.6 ms (1.21)  19.5 ms (1.23)  18.0 ms (1.39)
# and compile time at 512 pairs of 64x4: unrolled 19.5 s, sum 11.6 s, matmul 10.9 s (adamw 5.5 s).
# optax.adamw updates mu and nu in two kernels per leaf, and XLA recomputes a fused apply in both.
# With the rank axis last that is free (a profile of 128 pairs 4096x16: the a-gradients' mu and
# nu kernels took 5.2 and 5.4 thread-ms per step, against 5.1 and 7.0 in optax.adamw), but with
# the rank axis first each output row reads all r rows of the gradient, in each kernel: 16.5
# thread-ms each for the b-gradients, against 3.8 and 3.0. Their matmul (2.5 thread-ms per kernel
# plus the dot) brought the update from 36.8 to 34.9 ms and its compile time from 9.5 to 6.5 s.
# By rank (`--ab`'s flip, same run, matmul against unrolled for the rank-first gradients only):
#   48 pairs 1024 x r    r=4: 1.35 / 1.27 ms   r=8: 1.96 / 2.00 ms   r=16: 4.89 / 5.70 ms
#   64 pairs 4096 x r    r=4: 4.73 / 4.72 ms   r=8: 7.20 / 7.58 ms   r=16 (128 pairs): 34.7 / 36.8
# At r=4 the unrolled form was faster at 1024 (by 6%; 11% in another run, 2.14 / 1.90 ms) and as
# fast at 4096; from r=8 the matmul is as fast or faster, and the unrolled form always compiled
# slower (1.24 / 1.49 s at 1024x4, 5.6 / 8.9 s at 4096x16): on CPU the matmul is taken at every
# rank. The other way round, a matmul for the rank-last (a) gradients too compiled faster but
# ran slower (128 pairs 4096x16 without page faults: 45.4 against 28.4 ms, compile 2.5 against
# 6.1 s; 48 pairs 1024x4: 1.76 against 1.51 ms, 0.88 against 1.22 s): they keep the unrolled form.
_UNROLL_MAX_RANK = 32
_UNROLL_MIN_SIZE = 4096
# Pairs of one kind whose Grams are inverted by one batched call (see _precondition_chunk).
# Compile time of the preconditioner alone at 512 pairs of 64x4 on CPU, by pairs per chunk (matmul
# apply): 4: 4.9 s, 16: 3.3 s, 32: 3.2 s, 64: 3.7 s, 256: 7.3 s. Small chunks mean many while
# loops (one inverse per Gram took 62 s), large ones many slices of one buffer, in which XLA's
# passes grow superlinearly (1024 slices of one (1024, 4, 4) array: 13.5 s, against 1.0 s for as
# many elementwise ops on separate arrays).
# XLA:CPU compiles a fused kernel once for all leaves whose kernels are identical, and a leaf's
# kernel includes the slice of its chunk's inverses at its own offset: a chunk of n pairs makes
# up to 2n distinct kernels. That matters for the large unrolled kernels, whose pairs are batched
# by 8 (scaled_adamw's compile time at 48 pairs of 1024x4, in chunks of 4 / 8 / 16 / 32: 1.18 /
# 1.13 / 1.45 / 2.70 s; at 128 pairs of 4096x16: 5.69 / 5.22 / 5.54 / 6.53 s; update times alike
# within noise, except 32).
_CHUNK = 32
_UNROLLED_CHUNK = 8
# Factors smaller than this are stacked for one batched Gram on every backend (see _chunk_grams).
_STACK_MAX_SIZE = 4096
# The backends that take the CPU's form at each of three choices, each measured on CPU (see
# _apply, _safe_inverse and _chunk_grams); other backends take the other form. On GPU only the
# unrolled apply has been measured. `benchmarks/update_overhead.py --ab` times each choice flipped
# for the backend it runs on.
_MATMUL_APPLY_BACKENDS = ("cpu",)
_GAUSS_JORDAN_BACKENDS = ("cpu",)
_SEPARATE_GRAMS_BACKENDS = ("cpu",)


def _by_backend(backends: Sequence[str], chosen, other, *args):
    """``chosen(*args)`` on the given backends, ``other(*args)`` elsewhere."""
    return jax.lax.platform_dependent(*args, default=other, **dict.fromkeys(backends, chosen))


def _compute_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 when an input is (and x64 is on)."""
    wide = any(jnp.dtype(d).itemsize > 4 for d in dtypes)
    return jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32)


def _gram(x: jax.Array, rank_axis: int, stacked: int, dtype) -> jax.Array:
    """``(*stack, r, r)`` Gram of a factor: contracts every axis but the stack and the rank."""
    x = x.astype(dtype)
    batch = tuple(range(stacked))
    contract = tuple(i for i in range(stacked, x.ndim) if i != rank_axis)
    return jax.lax.dot_general(
        x,
        x,
        ((contract, contract), (batch, batch)),
        precision=_HIGHEST,
        preferred_element_type=dtype,
        **_explicit_out_sharding(x, stacked),
    )


def _explicit_out_sharding(x: jax.Array, stacked: int) -> dict[str, Any]:
    """On a mesh of Explicit axes (``jax.make_mesh``'s default) a dot that contracts a sharded
    axis must be told its output sharding: the stacked axes keep theirs, the r x r is replicated.
    """
    explicit = _explicit_spec(x)
    if explicit is None:
        return {}
    mesh, spec = explicit
    return {"out_sharding": _named(mesh, (*spec[:stacked], None, None))}


def _typed_sharding(x) -> tuple[Any, tuple] | None:
    """``(mesh, spec padded to x.ndim)`` of the sharding in x's type, or None without a mesh."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    return mesh, (*sharding.spec, *(None,) * (np.ndim(x) - len(sharding.spec)))


def _explicit_spec(x) -> tuple[Any, tuple] | None:
    """``(mesh, spec padded to x.ndim)`` where x's sharding is part of its type (the mesh has
    Explicit axes, whose names are all the spec holds), else None."""
    typed = _typed_sharding(x)
    if typed is None or jax.sharding.AxisType.Explicit not in typed[0].axis_types:
        return None
    return typed


def _named(mesh, spec) -> jax.sharding.NamedSharding:
    # A NamedSharding, not a bare PartitionSpec: that one needs `jax.set_mesh` around the call.
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _axis_names(axis_name: Any) -> tuple[str, ...] | None:
    """``axis_name`` as a tuple of names; checked when the transformation is built so a bad value
    fails there rather than deep inside the first traced update."""
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if (
        not isinstance(names, (tuple, list))
        or not names
        or not all(isinstance(n, str) for n in names)
    ):
        raise TypeError(
            "axis_name must be None, a mesh axis name (str) or a non-empty tuple/list of mesh axis "
            f"names, got {axis_name!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name names an axis twice: {axis_name!r}.")
    return tuple(names)


def _varying(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies along, from shard_map's type (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    varying = manual.varying if manual is not None else getattr(aval, "vma", None)
    return frozenset(varying or ())


def _manual_axes(names, where: str, hint: str = "") -> frozenset:
    """Those of ``names`` that are manual axes here; a name that is not a mesh axis is an error.

    A name that is not a mesh axis would otherwise just never match a varying axis and be skipped
    silently. A mesh axis that is not manual here (an Auto/Explicit axis of a partial shard_map,
    or ``jax.jit`` under ``jax.set_mesh``) holds global values that XLA reduces itself.
    """
    mesh = jax.sharding.get_abstract_mesh()
    unknown = sorted({n for n in names if n not in mesh.axis_names})
    if unknown:
        here = (
            f"the current mesh has axes {tuple(mesh.axis_names)}"
            if mesh.axis_names
            else "there is no mesh here (not inside jax.shard_map)"
        )
        raise ValueError(
            f"riemannian_preconditioner({where}): {', '.join(map(repr, unknown))} is not a mesh "
            f"axis: {here}. Name the shard_map mesh axes the factors are sharded over{hint}."
        )
    return frozenset(n for n in names if n in mesh.manual_axes)


def _tracks_varying(axis: str) -> bool:
    """Whether shard_map tracks varying axes here: ``axis_index`` varies along its axis by
    definition, unless ``check_vma=False`` (or ``pmap``) turned the tracking off."""
    return axis in _varying(jax.lax.axis_index(axis))


def _sum_axes_by_name(names: tuple[str, ...]):
    """``pair_axes(pair, p_leaves)``: per factor (b, then a), the named manual axes it varies
    along; its Gram is summed over exactly those."""
    manual = _manual_axes(
        names,
        f"axis_name={names!r}",
        "; under jax.jit leave axis_name=None (XLA sums sharded Grams itself)",
    )
    for n in sorted(manual):
        if not _tracks_varying(n):
            raise ValueError(
                f"riemannian_preconditioner(axis_name={names!r}) needs shard_map's varying-axes "
                f"types to know which factors are sharded over {n!r}, and they are off here "
                "(jax.shard_map(..., check_vma=False), or jax.pmap). Use check_vma=True (the "
                "default), pass specs= (the factors' PartitionSpecs), or run the update under "
                "jax.jit on sharded global arrays with axis_name=None."
            )

    def pair_axes(pair, p_leaves):
        # A factor replicated over an axis (b of a row-parallel layer) already holds its whole
        # Gram: summing it there would multiply it by the axis size.
        return tuple(
            tuple(sorted(manual & _varying(p_leaves[i]))) for i in (pair.b_index, pair.a_index)
        )

    return pair_axes


def _sum_axes_by_spec(leaf_specs: list[Any]):
    """``pair_axes(pair, p_leaves)``: per factor (b, then a), the manual mesh axes its feature
    axes are sharded over according to its PartitionSpec; its Gram is summed over exactly those.

    Its stacked axes hold whole layers (never summed over), and its rank axis must not be split
    inside shard_map, where each device would invert a Gram of a block of the rank.
    """
    manual_here = jax.sharding.get_abstract_mesh().manual_axes
    tracked = frozenset(n for n in manual_here if _tracks_varying(n))

    def factor_axes(x, path: str, spec, rank_axis: int, stacked: int) -> tuple[str, ...]:
        entries = (*(spec or ()), *(None,) * np.ndim(x))

        def names(i):
            e = entries[i]
            return {e} if isinstance(e, str) else set(e or ())

        feature = set().union(*(names(i) for i in range(stacked, np.ndim(x)) if i != rank_axis))
        rank = names(rank_axis)
        manual = _manual_axes(feature | rank, f"specs: '{path}' has spec {spec}")
        if manual & rank:
            raise ValueError(
                f"riemannian_preconditioner(specs=...): '{path}' has its rank axis sharded over "
                f"{sorted(manual & rank)} (spec {spec}) inside shard_map, where each device would "
                "invert the Gram of a block of the rank. Leave the rank axis unsharded, or run the "
                "update under jax.jit on the global arrays."
            )
        axes = tuple(sorted(manual & feature))
        missing = [n for n in axes if n in tracked and n not in _varying(x)]
        if missing:
            raise ValueError(
                f"riemannian_preconditioner(specs=...): the spec of '{path}', {spec}, shards it "
                f"over {missing}, but inside this shard_map it does not vary along them: pass the "
                "same PartitionSpecs as shard_map's in_specs."
            )
        return axes

    def pair_axes(pair, p_leaves):
        if not manual_here:
            return (), ()  # not inside shard_map: global arrays, whose Grams XLA sums itself
        return tuple(
            factor_axes(p_leaves[i], path, leaf_specs[i], axis, pair.stacked)
            for i, path, axis in (
                (pair.b_index, pair.info.b_path, pair.b_rank_axis),
                (pair.a_index, pair.info.a_path, pair.a_rank_axis),
            )
        )

    return pair_axes


def _keep_sharding(g: jax.Array, rank_axis: int, fn) -> jax.Array:
    """``fn(g)``, a map of g's rank axis, with g's sharding kept.

    Where shardings are types (Explicit axes) slicing a sharded rank axis is a type error, so that
    axis alone is gathered first (a LoRA gradient is small) and the result resharded like ``g``.
    Under Auto sharding the types carry no sharding and XLA gave the result ``inv``'s (replicated)
    one; adding ``0 * g`` (exact for finite ``g``, fused into the same kernel) hands it g's. With a
    single device there is no sharding to keep, and the addition is skipped: it cost 0.5 s of
    compile time at 512 pairs of 64x4 on CPU, and on the matmul path a second read of ``g``.
    """
    typed = _typed_sharding(g)
    if typed is None or jax.sharding.AxisType.Auto in typed[0].axis_types:
        return fn(g) + g * 0 if jax.device_count() > 1 else fn(g)
    mesh, spec = typed
    if spec[rank_axis] is None:
        return fn(g)
    gathered = (*spec[:rank_axis], None, *spec[rank_axis + 1 :])
    out = fn(jax.sharding.reshard(g, _named(mesh, gathered)))
    return jax.sharding.reshard(out, _named(mesh, spec))


def _apply(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int, dtype) -> jax.Array:
    """Multiplies the rank axis of ``g`` by the symmetric ``inv`` and casts back to g's dtype.

    The two elementwise forms are fused into the next optimizer's update; the matmul (large
    ranks, and on CPU large gradients whose rank axis is not the last) is a dot whose HLO does
    not grow with ``r``. See ``_UNROLL_MAX_RANK`` for which form is used where, and the timings.
    Elementwise work keeps ``g``'s sharding, which ``jnp.linalg.solve`` was seen not to, and every
    product is exact float32 on any backend.
    """
    gc = g.astype(dtype)
    r = g.shape[rank_axis]
    if r > _UNROLL_MAX_RANK:
        out = _apply_matmul(gc, inv, rank_axis, stacked, dtype)
    elif np.size(g) < _UNROLL_MIN_SIZE:
        out = _apply_summed(gc, inv, rank_axis, stacked)
    elif rank_axis == g.ndim - 1:
        out = _apply_unrolled(gc, inv, rank_axis, stacked)
    else:
        # The CPU measurements are at _UNROLL_MAX_RANK. Elsewhere the unrolled form stays, as it
        # was when measured on an H200: a matmul per leaf would add a kernel launch per gradient,
        # and whether it wins there too has not been measured (`--ab` of the update benchmark).
        out = _by_backend(
            _MATMUL_APPLY_BACKENDS,
            functools.partial(_apply_matmul, rank_axis=rank_axis, stacked=stacked, dtype=dtype),
            functools.partial(_apply_unrolled, rank_axis=rank_axis, stacked=stacked),
            gc,
            inv,
        )
    return _cast_back(out, g.dtype)


def _cast_back(x: jax.Array, dtype) -> jax.Array:
    """``x`` in the gradient's dtype, saturating at its largest finite value where that is
    below the compute dtype's (float16): with ``reg=0`` a nearly rank-deficient Gram is not
    always told from a singular one in float32 (its last pivot is rounding noise, seen up to
    ~2000 eps times the largest diagonal) and its inverse can scale a gradient past 65504."""
    big = float(jnp.finfo(dtype).max)  # a Python float: weakly typed, no dtype promotion
    if big < float(jnp.finfo(x.dtype).max):
        x = jnp.clip(x, -big, big)  # elementwise: fused into the next optimizer's kernel
    return x.astype(dtype)


def _apply_unrolled(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int) -> jax.Array:
    """r broadcast multiply-adds: the preconditioned gradient is never written out."""
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


def _apply_summed(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int) -> jax.Array:
    """One broadcast product summed over k: a few HLO ops whatever r is."""
    r = g.shape[rank_axis]
    gk = jnp.expand_dims(g, rank_axis + 1)
    shape = [*g.shape[:stacked]] + [1] * (g.ndim + 1 - stacked)
    shape[rank_axis], shape[rank_axis + 1] = r, r
    return jnp.sum(gk * inv.reshape(shape), axis=rank_axis)


def _unrolled(g, rank_axis: int) -> bool:
    """Whether :func:`_apply` makes a large per-leaf kernel for ``g``: the unrolled form (on CPU a
    matmul when the rank axis is not the last). Such pairs are chunked by ``_UNROLLED_CHUNK``."""
    return np.shape(g)[rank_axis] <= _UNROLL_MAX_RANK and np.size(g) >= _UNROLL_MIN_SIZE


def _apply_matmul(g: jax.Array, inv: jax.Array, rank_axis: int, stacked: int, dtype):
    # Operand order chosen so the result comes out in g's axis order with no transpose. With the
    # rank axis first this is inv @ g, contracting inv's last axis: XLA:CPU hands a dot to
    # YNNPACK only if its lhs is contracted on its last axis, and sent inv.T @ g (the same product,
    # inv being symmetric) to Eigen instead: scaled_adamw at 128 pairs of 4096x16, 28.3 and 28.6
    # against 29.1 and 30.2 ms per update (two runs, steps alternating, no page faults).
    batch = tuple(range(stacked))
    if rank_axis == stacked:
        return jax.lax.dot_general(
            inv,
            g,
            (((stacked + 1,), (rank_axis,)), (batch, batch)),
            precision=_HIGHEST,
            preferred_element_type=dtype,
        )
    out = jax.lax.dot_general(
        g,
        inv,
        (((rank_axis,), (stacked,)), (batch, batch)),
        precision=_HIGHEST,
        preferred_element_type=dtype,
    )
    return out if rank_axis == g.ndim - 1 else jnp.moveaxis(out, -1, rank_axis)


def _safe_inverse(m: jax.Array, reg: jax.Array) -> jax.Array:
    """Batched ``inv(m + reg*I)`` of PSD ``(..., r, r)`` matrices, identity where singular.

    LoRA starts with ``b = 0`` and users set ``reg=0``, so singular matrices are routine. Like the
    reference code (which falls back to the identity when ``torch.inverse`` fails), a matrix that
    is not numerically positive definite is replaced by the identity.

    On CPU this is Gauss-Jordan elimination in plain XLA ops: with the LAPACK Cholesky of jaxlib
    0.10.0, 0.10.1 and 0.10.2 (every 0.10 release), the update of 16 rank-64 pairs in
    ``test_many_high_rank_pairs_do_not_hang`` never finishes, every thread idle, when its 32 Grams
    are inverted in batches of 8 or 2 (0.10.1: even one at a time; in one batch of 32 it finishes
    in 1.4 s); jaxlib 0.8.3 and 0.9.2 finish in 0.6 s. Inverses are a small part of the update
    (all 256 Grams of 128 rank-16 pairs in under 3 ms), so the loop stays on CPU for every
    version rather than depend on batch sizes. Elsewhere it is the backend's batched Cholesky.
    """
    explicit = _explicit_spec(m)
    if explicit is not None and any(explicit[1]):
        # Stacked Grams sharded over Explicit mesh axes: jnp.linalg.cholesky (jax 0.10.2) raises a
        # ShardingTypeError on a sharded batch axis, so they are gathered (a few r x r matrices per
        # layer) and the inverses resharded back.
        mesh, spec = explicit
        inv = _safe_inverse(jax.sharding.reshard(m, _named(mesh, ())), reg)
        return jax.sharding.reshard(inv, _named(mesh, spec))
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    m = m + jnp.asarray(reg, m.dtype) * eye
    return _by_backend(_GAUSS_JORDAN_BACKENDS, _gauss_jordan_inverse, _cholesky_inverse, m, eye)


def _gauss_jordan_inverse(m: jax.Array, eye: jax.Array) -> jax.Array:
    """Inverse of SPD ``m`` by Gauss-Jordan without pivoting (stable for SPD), identity if singular.

    Step ``k``'s pivot is the ``k``-th Schur complement's leading entry, i.e. the square of the
    Cholesky factor's ``k``-th diagonal entry, so the singularity test matches
    :func:`_cholesky_inverse`'s. The steps run in a ``scan``: unrolled in Python they took longer
    to compile and to run (scaled_adamw at 128 pairs of 4096x16: update 37.3 against 34.0 ms,
    compile 11.5 against 5.6 s; at 512 pairs of 64x4: compile 15.3 against 9.5 s).
    """
    r = m.shape[-1]
    idx = jnp.arange(r)
    scale = jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)

    # Any leading batch axes, as in the Cholesky path: a chunk's (2n, *stack, r, r) Grams are not
    # reshaped, which a stacked axis sharded over Explicit mesh axes would not allow.
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


def _cholesky_inverse(m: jax.Array, eye: jax.Array) -> jax.Array:
    """Inverse of SPD ``m`` from its Cholesky factor, identity if singular.

    The factorisation only reads the lower triangle, so ``m`` need not be symmetrised first.
    """
    chol = jnp.linalg.cholesky(m)
    pivots = jnp.diagonal(chol, axis1=-2, axis2=-1)
    scale = jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)
    # NaN pivots (failed factorisation) compare False, so they also select the identity.
    ok = jnp.min(pivots, axis=-1) ** 2 > jnp.finfo(m.dtype).eps * scale
    linv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    inv = jnp.matmul(jnp.swapaxes(linv, -1, -2), linv, precision=_HIGHEST)
    return jnp.where(ok[..., None, None], inv, eye)


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
    then see the preconditioned gradient). Pairs are found by path (see :mod:`rplora_jax.pairing`
    and :func:`rplora_jax.find_lora_pairs`); every other leaf passes through unchanged. Leading
    axes shared by both factors are independent stacked layers, each with its own Grams.

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
        ``nnx.LoRA``/``nnx.LoRALinear``, this library's layers, gemma's ``peft`` and qwix.
        See :func:`rplora_jax.find_lora_pairs`. Under ``optax.inject_hyperparams`` a bare match
        function must be in ``static_args`` (or wrapped in ``PairingRule``), or it is taken for
        a schedule.
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

      Followed by ``optax.sgd`` this is scaled GD; :func:`scaled_adamw` is the AdamW version.
    """
    _check_reg(reg)
    axis_names = _axis_names(axis_name)
    if axis_names is not None and specs is not None:
        raise ValueError(
            "riemannian_preconditioner: pass axis_name or specs, not both (specs says which "
            "axes each factor is sharded over, axis_name only which axes to sum over)."
        )

    def find(tree):
        pairs, leaves, treedef = match_pairs(tree, rules=rules, stacked_axes=stacked_axes)
        if not pairs and not allow_no_pairs:
            raise no_pairs_error(tree, "riemannian_preconditioner")
        return pairs, leaves, treedef

    def init_fn(params):
        find(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "riemannian_preconditioner needs the current parameters: call "
                "update(updates, state, params)."
            )
        # Paired on the parameters, so a gradient of the wrong shape is named as such.
        pairs, p_leaves, treedef = find(params)
        g_leaves, g_treedef = jax.tree_util.tree_flatten(
            updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )
        if g_treedef != treedef:
            raise ValueError(
                "params and updates have different tree structures:\n"
                f"  updates: {g_treedef}\n  params:  {treedef}"
            )
        if not pairs:
            return updates, state
        if axis_names is not None:
            sum_axes = _sum_axes_by_name(axis_names)
        elif specs is not None:
            sum_axes = _sum_axes_by_spec(_leaf_specs(specs, params))
        else:
            sum_axes = _no_sum
        return treedef.unflatten(_precondition(pairs, g_leaves, p_leaves, reg, sum_axes)), state

    return optax.GradientTransformation(init_fn, update_fn)


def _leaf_specs(specs, params) -> list[Any]:
    """One PartitionSpec (or None) per leaf of ``params``, from a tree of them or a prefix of one,
    as ``shard_map``'s ``in_specs`` takes them. Matched by path, so the container types may
    differ (an ``nnx.State`` of ``nnx.Variable``-wrapped specs for plain dicts of arrays)."""

    def is_spec(x):
        return x is None or isinstance(x, jax.sharding.PartitionSpec)

    specs = unwrap_variables(specs)
    by_path = {
        path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    }
    bad = next(((p, x) for p, x in by_path.items() if not is_spec(x)), None)
    if bad is not None:
        raise ValueError(
            f"riemannian_preconditioner(specs=...) holds {bad[1]!r} at '{bad[0]}', not a "
            "PartitionSpec."
        )
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
    prefixes = [_longest_prefix(path_str(p), by_path) for p, _ in flat]
    missing = [path_str(p) for (p, _), prefix in zip(flat, prefixes, strict=True) if prefix is None]
    if missing:
        raise ValueError(
            f"riemannian_preconditioner(specs=...) has no spec for {missing}: give a tree of "
            "PartitionSpecs with the parameters' structure, or a prefix of it, as shard_map's "
            "in_specs."
        )
    # A None spec may stand for an absent parameter (a None bias); a PartitionSpec may not.
    used = set(prefixes)
    unused = sorted(p for p, x in by_path.items() if x is not None and p not in used)
    if unused:
        raise ValueError(
            f"riemannian_preconditioner(specs=...) has specs for no parameter: {unused}."
        )
    return [by_path[prefix] for prefix in prefixes]


def _longest_prefix(path: str, paths: Collection[str]) -> str | None:
    """The longest of ``paths`` that is ``path`` or a ``/``-prefix of it ("" is everyone's)."""
    tokens = path.split("/")
    return next(
        ("/".join(tokens[:n]) for n in range(len(tokens), -1, -1) if "/".join(tokens[:n]) in paths),
        None,
    )


def _no_sum(pair, p_leaves) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (), ()


def _precondition(pairs, g_leaves, p_leaves, reg, sum_axes) -> list[Any]:
    """``sum_axes(pair, p_leaves)``: the manual mesh axes to sum b's and a's Grams over."""
    out = list(g_leaves)
    kinds: dict[Any, list[Any]] = {}
    for pair in pairs:
        leaves = [src[i] for src in (p_leaves, g_leaves) for i in pair[:2]]
        _check_shapes(pair, leaves[:2], leaves[2:])
        axes = sum_axes(pair, p_leaves)
        kinds.setdefault((_kind(pair, leaves), axes), []).append(pair)
    for (_, axes), same in kinds.items():
        first = same[0]
        unrolled = any(
            _unrolled(g_leaves[i], axis)
            for i, axis in ((first.a_index, first.a_rank_axis), (first.b_index, first.b_rank_axis))
        )
        size = _UNROLLED_CHUNK if unrolled else _CHUNK
        for c in range(0, len(same), size):
            _precondition_chunk(same[c : c + size], g_leaves, p_leaves, reg, axes, out)
    return out


def _kind(pair, leaves) -> tuple:
    """Pairs of one kind have the same shapes, layout, stacked axes, dtypes and sharding types, so
    their Grams can be inverted by one batched call."""
    types = tuple((np.shape(x), jnp.result_type(x), _varying(x), _sharding_type(x)) for x in leaves)
    return (pair.a_rank_axis, pair.b_rank_axis, pair.stacked, types)


def _sharding_type(x) -> Any:
    typed = _typed_sharding(x)
    if typed is None:
        return None
    mesh, spec = typed
    return (spec, tuple(mesh.axis_types), tuple(mesh.axis_names), mesh.shape_tuple)


def _precondition_chunk(chunk, g_leaves, p_leaves, reg, axes, out) -> None:
    """Preconditions up to ``_CHUNK`` pairs of one kind, with one batched inverse of their Grams;
    ``axes``: the manual mesh axes to sum their b's and their a's Grams over.

    The apply stays per leaf, so that XLA fuses it into the next optimizer's per-leaf elementwise
    update. Stacking the gradients of a kind to apply the inverses in one batch, then splitting
    the result, was measured and rejected on CPU: each leaf's update then slices one shared buffer
    at its own offset, so XLA compiles a distinct kernel per leaf and its passes grow
    superlinearly in those slices (8.9 s against 3.8 s to compile scaled_adamw at 128 pairs of
    64x4), and the copies add two passes over every gradient. Sharing one inverse call between
    the partial chunks of several kinds (a stacked Llama's q/k/v/o, gate/up and down) was also
    measured and rejected: it saved ~0.5 s of a cold compile of benchmark set (d) (2.8 against
    3.3 s) but made its update slower (820 and 852 ms against 762 and 702 ms, two runs), and the
    same stacked model at rank 16 and 8 slower too (85.9 against 81.0 ms, 37.9 against 35.8 ms):
    separate inverses of independent kinds run alongside other work.
    """
    first, n = chunk[0], len(chunk)
    stacked = first.stacked
    dtype = _compute_dtype(
        *(jnp.result_type(src[i]) for src in (p_leaves, g_leaves) for i in first[:2])
    )
    # The a-gradient is preconditioned by b's Gram and vice versa.
    grams = [
        _chunk_grams([p_leaves[getattr(p, attr)] for p in chunk], axis, stacked, dtype)
        for axis, attr in ((first.b_rank_axis, "b_index"), (first.a_rank_axis, "a_index"))
    ]
    grams = [jax.lax.psum(g, names) if names else g for g, names in zip(grams, axes, strict=True)]
    inv = _safe_inverse(jnp.concatenate(_same_sharding(grams)), reg)
    for i, pair in enumerate(chunk):
        for index, axis, k in (
            (pair.a_index, pair.a_rank_axis, i),
            (pair.b_index, pair.b_rank_axis, n + i),
        ):
            apply = functools.partial(
                _apply, inv=inv[k], rank_axis=axis, stacked=stacked, dtype=dtype
            )
            out[index] = _keep_sharding(g_leaves[index], axis, apply)


def _same_sharding(grams: list[jax.Array]) -> list[jax.Array]:
    """The a- and b-Grams of a chunk, replicated if their stacked axes are sharded differently
    (a and b of one layer sharded unlike each other): on Explicit axes concatenating them would
    be a type error. They are a few r x r matrices per layer."""
    specs = [_explicit_spec(g) for g in grams]
    if specs[0] is None or all(s[1] == specs[0][1] for s in specs):
        return grams
    mesh = specs[0][0]
    return [jax.sharding.reshard(g, _named(mesh, ())) for g in grams]


def _chunk_grams(factors, rank_axis: int, stacked: int, dtype) -> jax.Array:
    """``(n, *stack, r, r)`` Grams of ``n`` factors of one kind.

    One batched dot over the stacked factors, except for large factors on CPU: there the copy and
    XLA:CPU's batched dot cost more than they save (128 factors of 4096x16: 28 ms stacked against
    5.0 ms for one dot each; the separate dots add little compile time, 0.1 s for 512). Below
    ``_STACK_MAX_SIZE`` elements stacking wins on CPU as well (512 pairs of 64x4: update 1.26x
    adamw's against 1.38x, compile 10.1 s against 11.1 s). On GPU the copy (~0.3 ms for the
    factors of a 7B Llama's 224 rank-64 pairs on an H200) is expected to cost less than launching
    a kernel per factor (448 of them); not measured here.
    """

    def batched(*fs):
        return _gram(jnp.stack(fs), rank_axis + 1, stacked + 1, dtype)

    def separate(*fs):
        return jnp.stack([_gram(f, rank_axis, stacked, dtype) for f in fs])

    if len(factors) == 1:
        return separate(*factors)
    if factors[0].size < _STACK_MAX_SIZE:
        return batched(*factors)
    return _by_backend(_SEPARATE_GRAMS_BACKENDS, separate, batched, *factors)


def _check_shapes(pair, params, grads) -> None:
    for path, p, g in zip((pair.info.a_path, pair.info.b_path), params, grads, strict=True):
        if np.shape(p) != np.shape(g):
            raise ValueError(
                f"Gradient at '{path}' has shape {np.shape(g)} but its parameter has shape "
                f"{np.shape(p)}."
            )


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
    """Scaled GD: :func:`riemannian_preconditioner` followed by ``optax.sgd``.

    Identical to ``optax.chain(riemannian_preconditioner(reg, ...),
    optax.sgd(learning_rate, momentum, nesterov))``. Keyword arguments are explicit (no
    ``**kwargs``) so ``optax.inject_hyperparams(scaled_sgd)`` works (with
    ``static_args=("stacked_axes",)`` when ``stacked_axes`` is given).

    Args:
      learning_rate: a float or an optax schedule.
      momentum: heavy-ball momentum, or ``None``.
      nesterov: use Nesterov momentum.
      reg: see :func:`riemannian_preconditioner`.
      rules: as in :func:`riemannian_preconditioner`.
      stacked_axes: as in :func:`riemannian_preconditioner`.
      allow_no_pairs: as in :func:`riemannian_preconditioner`.
      axis_name: as in :func:`riemannian_preconditioner`.
      specs: as in :func:`riemannian_preconditioner`.

    Returns:
      An ``optax.GradientTransformation``.

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
    """Scaled AdamW: :func:`riemannian_preconditioner` followed by ``optax.adamw``.

    Identical to ``optax.chain(riemannian_preconditioner(reg, ...), optax.adamw(...))``:
    Adam's moments see the preconditioned gradient, as in the paper and its peers.

    Args:
      learning_rate: a float or an optax schedule.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay, as in ``optax.adamw``.
      reg: see :func:`riemannian_preconditioner`.
      mask: weight-decay mask, as in ``optax.adamw``.
      rules: as in :func:`riemannian_preconditioner`.
      stacked_axes: as in :func:`riemannian_preconditioner`.
      allow_no_pairs: as in :func:`riemannian_preconditioner`.
      axis_name: as in :func:`riemannian_preconditioner`.
      specs: as in :func:`riemannian_preconditioner`.

    Returns:
      An ``optax.GradientTransformation``.

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
