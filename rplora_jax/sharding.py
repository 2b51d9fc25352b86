"""Sharding LoRA factors like the kernels they adapt.

Under ``jax.jit`` with a `jax.sharding.Mesh`, a LoRA pair is sharded the way its base kernel
is, axis by axis: ``a`` takes the kernel's input-axis (row) sharding, ``b`` its output-axis (column)
sharding, and the rank axis is replicated. The forward pass ``x @ a @ b`` then needs no more
communication than ``x @ W0`` and the preconditioner's ``r x r`` Grams are reduced by XLA across
the shards of the feature axes. For a Flax-layout kernel ``W0: (*stack, *in, *out)``::

    W0: P(*s, *i, *o)   ->   a: P(*s, *i, None)      b: P(*s, None, *o)

and for a PyTorch-layout weight ``W0: (*stack, *out, *in)`` with ``A: (r, in)``, ``B: (out, r)``::

    W0: P(*s, *o, *i)   ->   A: P(*s, None, *i)      B: P(*s, *o, None)

[`lora_factor_specs`][rplora_jax.sharding.lora_factor_specs] does this for one pair;
[`lora_specs`][rplora_jax.sharding.lora_specs] fills in the specs of every pair in a parameter tree
from the specs of their kernels; [`named_shardings`][rplora_jax.sharding.named_shardings] binds a
spec tree to a mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rplora_jax._trees import find_kernel, path_str
from rplora_jax.pairing import LoRAPair, RuleSpec, find_lora_pairs


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _padded(spec: PartitionSpec | None, ndim: int, path: str) -> tuple[Any, ...]:
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > ndim:
        raise ValueError(
            f"PartitionSpec {spec} of kernel '{path}' has {len(entries)} entries but the kernel "
            f"has only {ndim} axes."
        )
    return entries + (None,) * (ndim - len(entries))


def lora_factor_specs(
    kernel_spec: PartitionSpec | None,
    *,
    a_ndim: int,
    b_ndim: int,
    stacked: int = 0,
    layout: str = "flax",
) -> tuple[PartitionSpec, PartitionSpec]:
    """The specs of one LoRA pair, derived from its base kernel's spec.

    Args:
      kernel_spec: the kernel's ``PartitionSpec`` (trailing axes may be omitted; ``None`` means
        replicated).
      a_ndim: number of axes of the input-side factor (``a``, or ``A`` in PyTorch layout).
      b_ndim: number of axes of the output-side factor (``b``, or ``B``).
      stacked: number of leading stacked-layer axes shared by kernel and factors.
      layout: ``"flax"`` (``a: (*s, *in, r)``, ``b: (*s, r, *out)``, kernel ``(*s, *in, *out)``)
        or ``"torch"`` (``A: (*s, r, *in)``, ``B: (*s, *out, r)``, weight ``(*s, *out, *in)``).

    Returns:
      ``(a_spec, b_spec)``, full length, with the rank axis replicated.

    Examples:
      >>> from jax.sharding import PartitionSpec as P
      >>> from rplora_jax.sharding import lora_factor_specs
      >>> a_spec, b_spec = lora_factor_specs(P("data", "model"), a_ndim=2, b_ndim=2)
      >>> tuple(a_spec), tuple(b_spec)
      (('data', None), (None, 'model'))
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}.")
    # Both layouts: each factor is (*stack, rank, *features) up to the order of the last two.
    n_in, n_out = a_ndim - stacked - 1, b_ndim - stacked - 1
    if n_in < 1 or n_out < 1:
        raise ValueError(
            f"Factors with {a_ndim} and {b_ndim} axes and {stacked} stacked axes leave no "
            "feature axis; each factor needs at least one besides the rank."
        )
    k = _padded(kernel_spec, stacked + n_in + n_out, "<kernel>")
    s = k[:stacked]
    if layout == "flax":
        ins, outs = k[stacked : stacked + n_in], k[stacked + n_in :]
        return PartitionSpec(*s, *ins, None), PartitionSpec(*s, None, *outs)
    outs, ins = k[stacked : stacked + n_out], k[stacked + n_out :]
    return PartitionSpec(*s, None, *ins), PartitionSpec(*s, *outs, None)


def lora_specs(
    params: Any,
    param_specs: Any,
    *,
    kernel_path: Callable[[LoRAPair], str] | Mapping[str, str] | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
) -> Any:
    """A spec tree for ``params`` in which every LoRA factor is sharded like its base kernel.

    Args:
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``), with base kernels and
        LoRA factors.
      param_specs: a tree of the same structure whose leaves are ``PartitionSpec`` or ``None``
        (replicated), e.g. written by hand or from ``nnx.get_partition_spec``. The specs given
        for LoRA factors are ignored and replaced.
      kernel_path: where each pair's kernel is: a callable ``LoRAPair -> path`` or a mapping from
        ``a_path`` to the kernel's path; ``None`` looks for a qwix ``<w>`` sibling of
        ``<w>_lora_a``, then, from the factor's parent upwards (3 levels), a leaf named
        ``kernel``, ``w``, ``weight``, ``embedding`` or ``base_layer/weight`` (PEFT).
      rules: pairing rules, as in [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].
      stacked_axes: as in [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs].

    Returns:
      A tree of ``PartitionSpec`` with ``params``' structure.

    Raises:
      ValueError: naming the paths, when the trees differ, a kernel is not found, or a kernel's
        shape does not match its factors.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from rplora_jax.sharding import lora_specs
      >>> params = {"q": {"kernel": jnp.zeros((8, 16)),
      ...                 "lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 16))}}
      >>> specs = {"q": {"kernel": P("data", "model"), "lora_a": None, "lora_b": None}}
      >>> {k: tuple(v) for k, v in lora_specs(params, specs)["q"].items()}
      {'kernel': ('data', 'model'), 'lora_a': ('data', None), 'lora_b': (None, 'model')}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    spec_flat, spec_treedef = jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=_is_spec_leaf
    )
    # A None in params (an absent bias) is no parameter: a spec tree mapped over params (which
    # keeps that None, or gives it a spec) has no spec to give it.
    nones = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
    absent = {path_str(p) for p, x in nones if x is None}
    spec_flat = [(p, spec) for p, spec in spec_flat if path_str(p) not in absent]
    if len(spec_flat) != len(flat):
        raise ValueError(
            f"param_specs has {len(spec_flat)} leaves but params has {len(flat)}; give one "
            f"PartitionSpec (or None) per parameter.\n  params: {treedef}\n  "
            f"param_specs: {spec_treedef}"
        )
    paths = [path_str(p) for p, _ in flat]
    spec_paths = [path_str(p) for p, _ in spec_flat]
    if spec_paths != paths:
        # Leaves are matched by position: a misnamed key would silently lend its spec to another.
        missing = sorted(set(paths) - set(spec_paths))
        extra = sorted(set(spec_paths) - set(paths))
        raise ValueError(
            "param_specs does not have the parameters' structure: "
            f"no spec for {missing}, specs for non-parameters {extra}"
            if missing or extra
            else "param_specs lists the parameters in another order than params."
        )
    spec_leaves = [spec for _, spec in spec_flat]
    index = {p: i for i, p in enumerate(paths)}
    shapes = [tuple(np.shape(x)) for _, x in flat]
    specs = list(spec_leaves)
    for i, spec in enumerate(specs):
        if not _is_spec_leaf(spec):
            raise ValueError(f"param_specs at '{paths[i]}' is {spec!r}, not a PartitionSpec.")
    for pair in find_lora_pairs(params, rules=rules, stacked_axes=stacked_axes):
        if callable(kernel_path):
            kpath = kernel_path(pair)
        elif kernel_path is not None:
            kpath = kernel_path.get(pair.a_path)
        else:
            kpath = find_kernel(pair.a_path, pair.b_path, index)
        if kpath is None or kpath not in index:
            raise ValueError(
                f"No base kernel found for the LoRA pair a='{pair.a_path}', b='{pair.b_path}'"
                + (f" (looked for '{kpath}')" if kpath else "")
                + "; pass kernel_path= (a callable or a {a_path: kernel_path} mapping)."
            )
        a_i, b_i, k_i = index[pair.a_path], index[pair.b_path], index[kpath]
        a_shape, b_shape, k_shape = shapes[a_i], shapes[b_i], shapes[k_i]
        s = len(pair.stacked_shape)
        if pair.layout == "flax":
            expected = (*a_shape[:-1], *b_shape[s + 1 :])
        else:
            expected = (*b_shape[:-1], *a_shape[s + 1 :])
        if k_shape != expected:
            raise ValueError(
                f"Kernel '{kpath}' has shape {k_shape} but the LoRA pair a='{pair.a_path}' "
                f"{a_shape}, b='{pair.b_path}' {b_shape} ({pair.layout} layout) adapts a kernel "
                f"of shape {expected}; pass kernel_path= to name the right kernel."
            )
        _padded(specs[k_i], len(k_shape), kpath)
        specs[a_i], specs[b_i] = lora_factor_specs(
            specs[k_i], a_ndim=len(a_shape), b_ndim=len(b_shape), stacked=s, layout=pair.layout
        )
    specs = [PartitionSpec() if s is None else s for s in specs]
    return treedef.unflatten(specs)


def named_shardings(mesh: Mesh, specs: Any) -> Any:
    """Binds a tree of ``PartitionSpec`` (``None`` = replicated) to ``mesh``.

    Args:
      mesh: the device mesh.
      specs: a pytree of ``PartitionSpec`` or ``None`` leaves.

    Returns:
      The same tree with ``NamedSharding`` leaves, ready for ``jax.device_put`` or
      ``jax.jit(..., in_shardings=...)``.

    Examples:
      >>> import jax
      >>> from jax.sharding import PartitionSpec as P
      >>> from rplora_jax.sharding import named_shardings
      >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
      >>> named_shardings(mesh, {"w": P("data")})["w"].spec == P("data")
      True
    """
    return jax.tree.map(
        lambda s: NamedSharding(mesh, PartitionSpec() if s is None else s),
        specs,
        is_leaf=_is_spec_leaf,
    )
