"""Flax NNX LoRA layers: ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` plus a LoRA term.

``nnx.LoRA`` / ``nnx.LoRALinear`` already work with
[`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner]; these add what
they lack: the ``alpha / r`` (or ``alpha / sqrt(r)``) scale, dropout on the LoRA path, PEFT's
initialisers, ``LinearGeneral`` and ``Einsum`` variants, construction around an existing layer
(sharing its weights, see [`inject_nnx`][rplora_jax.layers.inject.inject_nnx]) and folding back into
the plain layer ([`merge`][rplora_jax.merge.merge]). The options are one
[`LoRAConfig`][rplora_jax.layers.config.LoRAConfig].

Each layer subclasses the NNX layer it extends, so ``kernel``/``bias`` keep their paths, and the
factors sit next to them as ``lora_a``/``lora_b`` (``nnx.LoRAParam``): ``wrt=nnx.LoRAParam`` trains
only them and the default pairing finds them, also when stacked by ``nnx.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSequence, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rplora_jax._linalg import fold_delta
from rplora_jax.layers.config import _ZEROS, LoRAConfig, _check_lora, _split_einsum
from rplora_jax.pairing import QWIX, find_lora_pairs


class _LoRAMixin:
    """Factor creation, the LoRA term and folding, shared by the NNX layers."""

    lora: LoRAConfig
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    kernel: nnx.Param
    # Leading kernel axes that are independent stacked layers (nnx.vmap, einsum shared axes).
    lora_batch_axes: int
    # lora_a's ndim when made: a layer constructed inside nnx.vmap has one more axis afterwards.
    lora_a_ndim: int

    def _init_lora(self, lora: LoRAConfig, a_shape, b_shape, n_batch: int, rngs: nnx.Rngs):
        self.lora = lora
        self.lora_batch_axes = n_batch
        self.lora_a_ndim = len(a_shape)
        dtype = lora.factor_dtype(self.param_dtype)
        self.lora_a = nnx.LoRAParam(lora.a_initializer(n_batch)(rngs.params(), a_shape, dtype))
        self.lora_b = nnx.LoRAParam(lora.b_initializer(n_batch)(rngs.params(), b_shape, dtype))
        rate = lora.dropout_rate
        self.lora_dropout = nnx.Dropout(rate, rngs=rngs) if rate > 0 else None

    def _lora_inputs(self, x: jax.Array):
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        return self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)

    def merged_kernel(self) -> jax.Array:
        """``kernel + s * a @ b`` in the kernel's dtype (the fold itself runs in float32+)."""
        kernel = self.kernel[...]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(
                f"{type(self).__name__}: cannot merge LoRA into a {kernel.dtype} kernel: the "
                "result would be truncated. Dequantize the kernel first."
            )
        a = self.lora_a[...]
        n_batch = self.lora_batch_axes + a.ndim - self.lora_a_ndim  # + layers stacked by vmap
        delta = fold_delta(a, self.lora_b[...], n_batch)
        return (kernel.astype(delta.dtype) + self.lora.scale * delta).astype(kernel.dtype)

    def _base_args(self) -> tuple[tuple, dict[str, Any]]:
        raise NotImplementedError

    def to_base(self) -> nnx.Module:
        """The plain layer with the LoRA term folded into its kernel (for serving)."""
        base_cls = next(c for c in type(self).__mro__ if c in _BASES)
        args, kwargs = self._base_args()
        out = base_cls(*args, kernel_init=_ZEROS, bias_init=_ZEROS, rngs=nnx.Rngs(0), **kwargs)
        out.kernel = nnx.clone(self.kernel)
        out.kernel[...] = self.merged_kernel()
        if self.bias is not None:
            out.bias = nnx.clone(self.bias)
        return out

    @classmethod
    def from_base(cls, base: nnx.Module, lora: LoRAConfig, *, rngs: nnx.Rngs):
        """Wraps an existing layer, sharing its ``kernel``/``bias`` variables (not copies).

        A kernel with extra leading axes (layers stacked by ``nnx.vmap``) gets factors stacked
        the same way.

        Args:
          base: the layer to extend (its class must be the one this layer subclasses).
          lora: the LoRA options; ``lora.param_dtype=None`` uses ``base.param_dtype``.
          rngs: random streams for the factors.

        Returns:
          A LoRA layer whose output equals ``base``'s while ``b = 0``.
        """
        args, kwargs = cls._base_args(base)
        new = cls(*args, lora=lora, kernel_init=_ZEROS, bias_init=_ZEROS, rngs=rngs, **kwargs)
        # Axes of base's kernel beyond the layer's own: layers stacked by nnx.vmap.
        stack = base.kernel.shape[: base.kernel.ndim - new.kernel.ndim]
        # Share the Variable objects themselves: their metadata (sharding...) is kept.
        new.kernel = base.kernel
        new.bias = base.bias
        if stack:
            a_shape, b_shape = new.lora_a.shape, new.lora_b.shape
            n_batch = len(stack) + new.lora_batch_axes
            new._init_lora(lora, (*stack, *a_shape), (*stack, *b_shape), n_batch, rngs)
            if new.lora_dropout is not None:
                _stack_stream(new.lora_dropout.rngs, stack)
        return new


def _stack_stream(stream: nnx.RngStream, stack: tuple[int, ...]) -> None:
    """One key and count per stacked layer, as ``nnx.split_rngs`` gives layers made under
    ``nnx.vmap``: ``nnx.scan``/``nnx.vmap`` over the layers then slice them like the factors."""
    stream.key.set_value(jax.random.split(stream.key.get_value(), stack))
    stream.count.set_value(jnp.zeros(stack, stream.count.get_value().dtype))


def _common_kwargs(layer: nnx.Module) -> dict[str, Any]:
    keys = ("use_bias", "dtype", "param_dtype", "precision", "promote_dtype")
    kwargs = {k: getattr(layer, k) for k in keys if hasattr(layer, k)}
    kwargs["preferred_element_type"] = getattr(layer, "preferred_element_type", None)
    return kwargs


class LoRALinear(_LoRAMixin, nnx.Linear):
    """``nnx.Linear`` plus a scaled LoRA term: ``y = x @ W0 + bias + s * dropout(x) @ a @ b``.

    State: ``kernel (in, out)``, ``bias (out,)`` as ``nnx.Linear``, plus ``lora_a (in, r)`` and
    ``lora_b (r, out)`` as ``nnx.LoRAParam``. Dropout follows ``train()`` / ``eval()``.

    Args:
      in_features: input features.
      out_features: output features.
      lora: the LoRA options.
      rngs: random streams.
      **linear_kwargs: passed to ``nnx.Linear`` (``use_bias``, ``dtype``, ``param_dtype``...).

    Examples:
      >>> from flax import nnx
      >>> import rplora_jax
      >>> layer = LoRALinear(4, 3, lora=rplora_jax.LoRAConfig(rank=2, alpha=4.0),
      ...                    rngs=nnx.Rngs(0))
      >>> layer.lora.scale, layer.lora_b.shape
      (2.0, (2, 3))
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(nnx.state(layer, nnx.LoRAParam))]
      ['lora_a']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora: LoRAConfig,
        rngs: nnx.Rngs,
        **linear_kwargs: Any,
    ):
        _check_lora(lora, type(self).__name__)
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self._init_lora(lora, (in_features, lora.rank), (lora.rank, out_features), 0, rngs)

    def _base_args(self):
        kwargs = {**_common_kwargs(self), "dot_general": self.dot_general}
        return (self.in_features, self.out_features), kwargs

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """Applies the layer."""
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self._lora_inputs(inputs)
        h = jnp.matmul(x, a, precision=self.precision)
        delta = jnp.matmul(h, b, precision=self.precision) * self.lora.scale
        return y + delta.astype(y.dtype)


class LoRALinearGeneral(_LoRAMixin, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` plus a LoRA term: ``lora_a: (*in, r)``, ``lora_b: (r, *out)``.

    This is the layer ``nnx.MultiHeadAttention`` builds its projections from. ``batch_axis`` is
    not supported.

    Args:
      in_features: input feature axes' sizes.
      out_features: output feature axes' sizes.
      lora: the LoRA options.
      rngs: random streams.
      **kwargs: passed to ``nnx.LinearGeneral`` (``axis``, ``use_bias``, ``dtype``...).

    Examples:
      >>> from flax import nnx
      >>> import rplora_jax
      >>> layer = LoRALinearGeneral(8, (2, 4), lora=rplora_jax.LoRAConfig(rank=3),
      ...                           rngs=nnx.Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape
      ((8, 3), (3, 2, 4))
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        lora: LoRAConfig,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        _check_lora(lora, type(self).__name__)
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        if self.batch_axis:
            raise ValueError("LoRALinearGeneral does not support batch_axis.")
        r = lora.rank
        self._init_lora(lora, (*self.in_features, r), (r, *self.out_features), 0, rngs)

    def _base_args(self):
        if self.batch_axis:  # reached from from_base(nnx.LinearGeneral(..., batch_axis=...))
            raise ValueError("LoRA does not support nnx.LinearGeneral with batch_axis.")
        kwargs = {
            **_common_kwargs(self),
            "axis": self.axis,
            "dot_general": self.dot_general,
            "dot_general_cls": self.dot_general_cls,
        }
        return (self.in_features, self.out_features), kwargs

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """Applies the layer."""
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self._lora_inputs(inputs)
        # Sorted, as nnx.LinearGeneral contracts them: the kernel's input axes are in that order.
        axis = tuple(sorted(ax % x.ndim for ax in self.axis))
        dims = ((axis, tuple(range(len(axis)))), ((), ()))
        h = jax.lax.dot_general(x, a, dims, precision=self.precision)
        delta = jax.lax.dot_general(
            h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )
        return y + (delta * self.lora.scale).astype(y.dtype)


class LoRAEinsum(_LoRAMixin, nnx.Einsum):
    """``nnx.Einsum`` plus a scaled LoRA term.

    The kernel axes must be ordered ``[shared][contracted][output]`` (``"btd,dnh->btnh"``,
    ``"btnh,nhd->btd"``, ``"ebd,edf->ebf"``); the factors are ``lora_a: (*shared, *contracted, r)``
    and ``lora_b: (*shared, r, *output)``, so ``a @ b`` has the kernel's layout and the shared axes
    are stacked pairs for the preconditioner. ``einsum_str`` must be given at construction.

    Args:
      einsum_str: the equation ``"x,kernel->out"``.
      kernel_shape: kernel shape.
      bias_shape: bias shape, or ``None`` for no bias.
      lora: the LoRA options.
      rngs: random streams.
      **einsum_kwargs: passed to ``nnx.Einsum``.

    Examples:
      >>> from flax import nnx
      >>> import rplora_jax
      >>> layer = LoRAEinsum("btd,dnh->btnh", (8, 2, 4), (2, 4),
      ...                    lora=rplora_jax.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape
      ((8, 2), (2, 2, 4))
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        lora: LoRAConfig,
        rngs: nnx.Rngs,
        **einsum_kwargs: Any,
    ):
        split = _split_einsum(
            einsum_str,
            kernel_shape,
            _check_lora(lora, type(self).__name__).rank,
            type(self).__name__,
        )
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **einsum_kwargs)
        self._init_lora(lora, split.a_shape, split.b_shape, split.n_shared, rngs)
        self.lora_x_a, self.lora_h_b = split.x_a, split.h_b

    def _base_args(self):
        if self.einsum_str is None:
            raise ValueError("LoRA on an nnx.Einsum needs one built with einsum_str.")
        kwargs = {**_common_kwargs(self), "einsum_op": self.einsum_op}
        kwargs.pop("use_bias", None)
        return (self.einsum_str, tuple(self.kernel_shape), self.bias_shape), kwargs

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding=None):
        """Applies the layer; ``einsum_str``, if given, must equal the constructor's."""
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(
                f"LoRAEinsum was built for {self.einsum_str!r}; its factors do not fit "
                f"{einsum_str!r}."
            )
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self._lora_inputs(inputs)
        h = jnp.einsum(self.lora_x_a, x, a, precision=self.precision)
        delta = jnp.einsum(self.lora_h_b, h, b, precision=self.precision) * self.lora.scale
        return y + delta.astype(y.dtype)


_BASES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# The LoRA layer for each base layer, most specific first.
_LORA_FOR_BASE: tuple[tuple[type, type], ...] = (
    (nnx.Linear, LoRALinear),
    (nnx.LinearGeneral, LoRALinearGeneral),
    (nnx.Einsum, LoRAEinsum),
)
_NNX_LORA = (LoRALinear, LoRALinearGeneral, LoRAEinsum)


def _layer_scales(model: nnx.Module) -> dict[str, float]:
    """The LoRA scale of each LoRA layer of ``model``, by ``/``-joined module path.

    This library's layers store theirs (``lora.scale``); Flax's ``nnx.LoRALinear`` and
    ``nnx.LoRA`` add ``x @ a @ b`` unscaled, so theirs is 1.
    """
    scales = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, _NNX_LORA):
            scales["/".join(map(str, path))] = float(module.lora.scale)
        elif isinstance(module, (nnx.LoRALinear, nnx.LoRA)):
            scales["/".join(map(str, path))] = 1.0
    return scales


def _get_child(parent: Any, key: Any) -> Any:
    """``parent.key`` or ``parent[key]``, as NNX paths index modules, lists and dicts."""
    if isinstance(parent, (Mapping, Sequence)) and not isinstance(parent, str):
        return parent[key]
    return getattr(parent, key)


def _set_child(parent: Any, key: Any, value: Any) -> None:
    """Sets ``parent.key`` or ``parent[key]`` in place."""
    if isinstance(parent, (Mapping, MutableSequence)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _replace_module(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
    """Puts ``new`` at ``path`` (as ``nnx.iter_modules`` gives it) inside ``root``, in place."""
    parent = root
    for key in path[:-1]:
        parent = _get_child(parent, key)
    _set_child(parent, path[-1], new)


def _replace_all(
    root: nnx.Module, found: list[tuple[tuple, nnx.Module]], new_for: Mapping[int, nnx.Module]
) -> list[tuple]:
    """Puts ``new_for[id(m)]`` at each ``(path, m)`` of ``found`` in ``root``, in place, and
    wherever else ``m`` appears: ``nnx.iter_modules`` lists a module shared at several paths
    (tied weights) at one of them only, and the next once that one is replaced.

    Returns:
      Every path replaced.
    """
    old = {id(m): m for _, m in found}
    todo = [(path, new_for[id(m)]) for path, m in found]
    replaced = []
    while todo:
        for path, new in todo:
            _replace_module(root, path, new)
            replaced.append(path)
        todo = [
            (path, new_for[id(m)])
            for path, m in nnx.iter_modules(root)
            if id(m) in old and old[id(m)] is m
        ]
    return replaced


def _fold_flax_lora_linear(layer: nnx.LoRALinear) -> nnx.Linear:
    # Flax's LoRALinear adds x @ a @ b with no scale, outside its dot_general: with a custom one
    # (a quantized matmul) the merged layer computes dot_general(x, W0 + a @ b), what merging
    # into such a layer means, though not the same function unless dot_general is the product.
    kernel = layer.kernel[...]
    delta = fold_delta(layer.lora.lora_a[...], layer.lora.lora_b[...], kernel.ndim - 2)
    out = nnx.Linear(
        layer.in_features,
        layer.out_features,
        kernel_init=_ZEROS,
        bias_init=_ZEROS,
        rngs=nnx.Rngs(0),
        dot_general=layer.dot_general,
        **_common_kwargs(layer),
    )
    out.kernel = nnx.clone(layer.kernel)
    out.kernel[...] = (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
    out.bias = nnx.clone(layer.bias)
    return out


def _folded(module: nnx.Module, path: str) -> nnx.Module | None:
    try:
        if isinstance(module, _NNX_LORA):
            return module.to_base()
        if isinstance(module, nnx.LoRALinear):
            return _fold_flax_lora_linear(module)
    except ValueError as err:
        raise ValueError(f"merge: '{path or '<root>'}': {err}") from err
    return None


def _merge_module(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA layer folded into its plain layer.

    Folds this library's layers (their scale is stored with them) and Flax's own
    ``nnx.LoRALinear``; raises ``ValueError`` naming any LoRA factor it cannot fold (for
    example ``nnx.LoRA`` used on its own, or qwix's ``<w>_lora_a``), so a model never comes back
    silently unmerged. ``model`` itself is untouched.
    """
    out = nnx.clone(model)
    root = _folded(out, "")
    if root is not None:
        return root
    found, new_for = [], {}
    for path, module in list(nnx.iter_modules(out)):
        new = _folded(module, "/".join(map(str, path))) if path else None
        if new is not None:
            found.append((path, module))
            new_for[id(module)] = new
    _replace_all(out, found, new_for)  # a tied layer becomes one merged layer at every path
    left = find_lora_pairs(nnx.state(out))
    if not left:
        return out
    # qwix's factors are parameters next to their weight <w>: a dict merge finds the kernel.
    how = (
        "Factors stored as parameters, as qwix's <w>_lora_a / <w>_lora_b, fold as a parameter "
        "dict with their scale: rplora_jax.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "
        "scale=alpha / rank) gives the parameters without LoRA, LoRA folded into each <w>."
        if any(p.rule == QWIX.name for p in left)
        else "Fold them yourself, or use this library's layers."
    )
    raise ValueError(
        "merge: these LoRA factors are not in a layer merge knows how to fold (this library's "
        f"LoRA layers, nnx.LoRALinear): {[p.a_path for p in left]}. {how}"
    )
