"""The optimizers on meshes: Explicit shardings, ``axis_name`` and ``specs`` in shard_map.

Under ``jax.jit`` on global arrays XLA sums sharded Grams itself; on a mesh of Explicit axes the
shardings are types, which the Gram dots, the inverse and the apply must state or keep; inside
``shard_map`` each Gram must be summed over the manual axes its factor's feature axes are split
over, and no others. Everything here serves the optimizers over LoRA pairs; the tall layouts
(rank axis last, features flat) are LoRA-RITE's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rplora_jax._trees import is_masked, path_str, unwrap_variables

# Per pair, the manual mesh axes to sum its b's and its a's Grams over.
SumAxes = Callable[[Any, list], tuple[tuple[str, ...], tuple[str, ...]]]


def typed_sharding(x) -> tuple[Any, tuple] | None:
    """``(mesh, spec padded to x.ndim)`` of the sharding in x's type, or None without a mesh."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    return mesh, (*sharding.spec, *(None,) * (np.ndim(x) - len(sharding.spec)))


def explicit_spec(x) -> tuple[Any, tuple] | None:
    """``(mesh, spec padded to x.ndim)`` where x's sharding is part of its type (the mesh has
    Explicit axes, whose names are all the spec holds), else None."""
    typed = typed_sharding(x)
    if typed is None or jax.sharding.AxisType.Explicit not in typed[0].axis_types:
        return None
    return typed


def named(mesh, spec) -> jax.sharding.NamedSharding:
    # A NamedSharding, not a bare PartitionSpec: that one needs `jax.set_mesh` around the call.
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def sharding_type(x) -> Any:
    """A hashable description of x's typed sharding: pairs of one kind share it."""
    typed = typed_sharding(x)
    if typed is None:
        return None
    mesh, spec = typed
    return (spec, tuple(mesh.axis_types), tuple(mesh.axis_names), mesh.shape_tuple)


def gram_sharding(x: jax.Array, stacked: int) -> jax.sharding.NamedSharding | None:
    """On Explicit axes, the output sharding a Gram dot that contracts a sharded axis must be
    told: the stacked axes keep theirs, the ``r x r`` is replicated."""
    explicit = explicit_spec(x)
    if explicit is None:
        return None
    mesh, spec = explicit
    return named(mesh, (*spec[:stacked], None, None))


def same_sharding(grams: list[jax.Array]) -> list[jax.Array]:
    """The a- and b-Grams of a chunk, replicated if their stacked axes are sharded differently
    (on Explicit axes their concatenation would be a type error); a few r x r per layer."""
    specs = [explicit_spec(g) for g in grams]
    if specs[0] is None or all(s[1] == specs[0][1] for s in specs):
        return grams
    mesh = specs[0][0]
    return [jax.sharding.reshard(g, named(mesh, ())) for g in grams]


def replicated(fn: Callable[[jax.Array], jax.Array], m: jax.Array) -> jax.Array:
    """``fn(m)`` on a replicated copy of ``m`` when its batch axes are sharded over Explicit
    axes (``jnp.linalg.cholesky`` refuses a sharded batch axis), resharded back like ``m``."""
    explicit = explicit_spec(m)
    if explicit is None or not any(explicit[1]):
        return fn(m)
    mesh, spec = explicit
    return jax.sharding.reshard(fn(jax.sharding.reshard(m, named(mesh, ()))), named(mesh, spec))


def keep_sharding(g: jax.Array, rank_axis: int, fn) -> jax.Array:
    """``fn(g)``, a map of g's rank axis, with g's sharding kept.

    On Explicit axes a sharded rank axis cannot be sliced: it alone is gathered and the result
    resharded like ``g``. Under Auto sharding XLA would give the result the inverse's
    (replicated) sharding; ``+ 0 * g`` (exact for finite ``g``, fused) hands it g's. One device
    has no sharding to keep, and the addition costs compile time: skipped.
    """
    typed = typed_sharding(g)
    if typed is None or jax.sharding.AxisType.Auto in typed[0].axis_types:
        return fn(g) + g * 0 if jax.device_count() > 1 else fn(g)
    mesh, spec = typed
    if spec[rank_axis] is None:
        return fn(g)
    gathered = (*spec[:rank_axis], None, *spec[rank_axis + 1 :])
    out = fn(jax.sharding.reshard(g, named(mesh, gathered)))
    return jax.sharding.reshard(out, named(mesh, spec))


def inner_rows(x, y, axes):
    """``x.T @ y`` over the rows of tall ``(..., rows, r)`` arrays, summed over the devices that
    split the rows; on Explicit axes the ``r x r`` result is replicated."""
    batch = tuple(range(x.ndim - 2))
    sharding = gram_sharding(x, x.ndim - 2)
    out = jax.lax.dot_general(
        x,
        y,
        (((x.ndim - 2,), (y.ndim - 2,)), (batch, batch)),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=x.dtype,
        **({} if sharding is None else {"out_sharding": sharding}),
    )
    return jax.lax.psum(out, axes) if axes else out


def tall(xs, rank_axis: int, stacked: int, dtype) -> jax.Array:
    """``(n, *stack, rows, r)``: the chunk's factors with the rank axis last, features flat."""
    return jnp.stack([_flat_features(jnp.asarray(x, dtype), rank_axis, stacked) for x in xs])


def _flat_features(x, rank_axis: int, stacked: int) -> jax.Array:
    x = jnp.moveaxis(x, rank_axis, -1)
    explicit = explicit_spec(x)
    if x.ndim - stacked > 2 and explicit is not None and any(explicit[1][stacked:]):
        # On Explicit axes several feature axes, one of them sharded, cannot be merged in
        # place: the factor's features are gathered first (a LoRA factor is small).
        mesh, spec = explicit
        x = jax.sharding.reshard(x, named(mesh, spec[:stacked]))
    return x.reshape(*x.shape[:stacked], -1, x.shape[-1])


def untall(x: jax.Array, like, rank_axis: int) -> jax.Array:
    """A tall ``(*stack, rows, r)`` array back in the layout, and sharding, of ``like``."""
    shape = list(np.shape(like))
    rank = shape.pop(rank_axis)
    out = jnp.moveaxis(x.reshape(*shape, rank), -1, rank_axis)
    explicit = explicit_spec(like)
    return out if explicit is None else jax.sharding.reshard(out, named(*explicit))


def check_axis_name(axis_name: Any) -> tuple[str, ...] | None:
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


def varying(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies along, from shard_map's type (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    axes = manual.varying if manual is not None else getattr(aval, "vma", None)
    return frozenset(axes or ())


def layer_axes(x, stacked: int, summed, spec: Any = None, by_spec: bool = False) -> tuple:
    """The manual mesh axes that split factor ``x``'s stacked layers across devices, whose
    totals over layers must be summed there too: from its PartitionSpec with ``by_spec``, else
    from shard_map's varying axes, less the axes its Grams are summed over."""
    manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)
    if not manual:
        return ()
    if by_spec:
        entries = (*(spec or ()), *(None,) * stacked)[:stacked]
        names = {n for e in entries for n in ((e,) if isinstance(e, str) else (e or ()))}
        return tuple(sorted(names & manual))
    return tuple(sorted((varying(x) & manual) - set(summed)))


def _manual_axes(names, who: str, where: str, hint: str = "") -> frozenset:
    """Those of ``names`` that are manual axes here; a name that is not a mesh axis is an error
    (it would never match a varying axis and be skipped silently). An Auto/Explicit axis holds
    global values that XLA reduces itself."""
    mesh = jax.sharding.get_abstract_mesh()
    unknown = sorted({n for n in names if n not in mesh.axis_names})
    if unknown:
        here = (
            f"the current mesh has axes {tuple(mesh.axis_names)}"
            if mesh.axis_names
            else "there is no mesh here (not inside jax.shard_map)"
        )
        raise ValueError(
            f"{who}({where}): {', '.join(map(repr, unknown))} is not a mesh "
            f"axis: {here}. Name the shard_map mesh axes the factors are sharded over{hint}."
        )
    return frozenset(n for n in names if n in mesh.manual_axes)


def _tracks_varying(axis: str) -> bool:
    """Whether shard_map tracks varying axes here: ``axis_index`` varies along its axis by
    definition, unless ``check_vma=False`` (or ``pmap``) turned the tracking off."""
    return axis in varying(jax.lax.axis_index(axis))


def sum_axes(axis_names: tuple[str, ...] | None, specs: Any, params: Any, who: str) -> SumAxes:
    """How the update finds, per pair, the manual axes to sum its Grams over: by name, by spec,
    or none (global arrays under ``jax.jit``)."""
    if axis_names is not None:
        return _sum_axes_by_name(axis_names, who)
    if specs is not None:
        return _sum_axes_by_spec(leaf_specs(specs, params, who), who)
    return lambda pair, p_leaves: ((), ())


def _sum_axes_by_name(names: tuple[str, ...], who: str) -> SumAxes:
    """Per factor, the named manual axes it varies along."""
    manual = _manual_axes(
        names,
        who,
        f"axis_name={names!r}",
        "; under jax.jit leave axis_name=None (XLA sums sharded Grams itself)",
    )
    for n in sorted(manual):
        if not _tracks_varying(n):
            raise ValueError(
                f"{who}(axis_name={names!r}) needs shard_map's varying-axes "
                f"types to know which factors are sharded over {n!r}, and they are off here "
                "(jax.shard_map(..., check_vma=False), or jax.pmap). Use check_vma=True (the "
                "default), pass specs= (the factors' PartitionSpecs), or run the update under "
                "jax.jit on sharded global arrays with axis_name=None."
            )

    def pair_axes(pair, p_leaves):
        # A factor replicated over an axis (b of a row-parallel layer) already holds its whole
        # Gram: summing it there would multiply it by the axis size.
        return tuple(
            tuple(sorted(manual & varying(p_leaves[i]))) for i in (pair.b_index, pair.a_index)
        )

    return pair_axes


def _sum_axes_by_spec(leaf_specs: list[Any], who: str) -> SumAxes:
    """Per factor, the manual axes its feature axes are sharded over by its PartitionSpec; its
    stacked axes hold whole layers, and a rank axis split inside shard_map is an error."""
    manual_here = jax.sharding.get_abstract_mesh().manual_axes
    tracked = frozenset(n for n in manual_here if _tracks_varying(n))

    def factor_axes(x, path: str, spec, rank_axis: int, stacked: int) -> tuple[str, ...]:
        entries = (*(spec or ()), *(None,) * np.ndim(x))

        def names(i):
            e = entries[i]
            return {e} if isinstance(e, str) else set(e or ())

        feature = set().union(*(names(i) for i in range(stacked, np.ndim(x)) if i != rank_axis))
        rank = names(rank_axis)
        manual = _manual_axes(feature | rank, who, f"specs: '{path}' has spec {spec}")
        if manual & rank:
            raise ValueError(
                f"{who}(specs=...): '{path}' has its rank axis sharded over "
                f"{sorted(manual & rank)} (spec {spec}) inside shard_map, where each device would "
                "invert the Gram of a block of the rank. Leave the rank axis unsharded, or run the "
                "update under jax.jit on the global arrays."
            )
        axes = tuple(sorted(manual & feature))
        missing = [n for n in axes if n in tracked and n not in varying(x)]
        if missing:
            raise ValueError(
                f"{who}(specs=...): the spec of '{path}', {spec}, shards it "
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


def leaf_specs(specs, params, who: str) -> list[Any]:
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
        raise ValueError(f"{who}(specs=...) holds {bad[1]!r} at '{bad[0]}', not a PartitionSpec.")
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
    prefixes = [_longest_prefix(path_str(p), by_path) for p, _ in flat]
    missing = [path_str(p) for (p, _), prefix in zip(flat, prefixes, strict=True) if prefix is None]
    if missing:
        raise ValueError(
            f"{who}(specs=...) has no spec for {missing}: give a tree of "
            "PartitionSpecs with the parameters' structure, or a prefix of it, as shard_map's "
            "in_specs."
        )
    # A None spec may stand for an absent parameter (a None bias); a PartitionSpec may not.
    used = set(prefixes)
    unused = sorted(p for p, x in by_path.items() if x is not None and p not in used)
    if unused:
        raise ValueError(f"{who}(specs=...) has specs for no parameter: {unused}.")
    return [by_path[prefix] for prefix in prefixes]


def _longest_prefix(path: str, paths: Collection[str]) -> str | None:
    """The longest of ``paths`` that is ``path`` or a ``/``-prefix of it ("" is everyone's)."""
    tokens = path.split("/")
    return next(
        ("/".join(tokens[:n]) for n in range(len(tokens), -1, -1) if "/".join(tokens[:n]) in paths),
        None,
    )
