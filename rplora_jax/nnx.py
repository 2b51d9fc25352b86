"""Flax NNX LoRA layers with scaling and dropout, an einsum variant, and folding for inference.

``nnx.LoRA`` / ``nnx.LoRALinear`` already work with :func:`rplora_jax.riemannian_preconditioner`;
these add what they lack: the ``alpha / r`` (or rank-stabilised ``alpha / sqrt(r)``) scale, dropout
on the LoRA path, PEFT's initialisers, an einsum layer, construction around an existing layer
(reusing its weights, see :func:`rplora_jax.inject.inject_nnx`) and :func:`merge`.

Both layers subclass the NNX layer they extend, so ``kernel``/``bias`` keep their paths and the
factors sit next to them as ``lora_a``/``lora_b`` (``nnx.LoRAParam``): ``wrt=nnx.LoRAParam`` trains
only them and the default pairing finds them, also when stacked by ``nnx.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSequence, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rplora_jax._common import (
    ZEROS,
    AInit,
    Initializer,
    a_initializer,
    check_dropout,
    check_rank,
    fold_delta,
    lora_scaling,
    split_einsum,
)

Dtype = Any


class _LoRAMixin:
    """Factor creation, the LoRA term and folding, shared by the NNX layers."""

    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    kernel: nnx.Param

    def _init_lora(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        n_batch: int,
        *,
        rank: int,
        alpha: float | None,
        rslora: bool,
        dropout_rate: float,
        a_init: AInit,
        b_init: Initializer,
        lora_param_dtype: Dtype,
        rngs: nnx.Rngs,
    ) -> None:
        where = type(self).__name__
        check_rank(rank, where)
        check_dropout(dropout_rate, where)
        self.rank = rank
        self.lora_scaling = lora_scaling(rank, alpha, rslora)
        self.lora_a = nnx.LoRAParam(
            a_initializer(a_init, rank, n_batch)(rngs.params(), a_shape, lora_param_dtype)
        )
        self.lora_b = nnx.LoRAParam(b_init(rngs.params(), b_shape, lora_param_dtype))
        self.lora_dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None

    def _kernel_ndim(self) -> int:
        return 2

    def _shared_axes(self) -> int:
        return 0

    def _lora_inputs(self, x: jax.Array, dtype: Dtype | None):
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        return nnx.nn.dtypes.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=dtype)

    def merged_kernel(self) -> jax.Array:
        """``kernel + s * a @ b`` in the kernel's dtype (the fold itself runs in float32+)."""
        kernel = self.kernel[...]
        # Leading axes over which the factors are independent: layers stacked by nnx.vmap (seen
        # here, outside the vmap, as extra kernel axes) and an einsum's shared axes.
        n_batch = kernel.ndim - self._kernel_ndim() + self._shared_axes()
        delta = fold_delta(self.lora_a[...], self.lora_b[...], n_batch)
        return (kernel.astype(delta.dtype) + self.lora_scaling * delta).astype(kernel.dtype)


def _reuse(value: jax.Array) -> Initializer:
    return lambda *_args, **_kwargs: value


class LoRALinear(_LoRAMixin, nnx.Linear):
    """``nnx.Linear`` plus a scaled LoRA term: ``y = x @ W0 + bias + s * dropout(x) @ a @ b``.

    State: ``kernel (in, out)``, ``bias (out,)`` as ``nnx.Linear``, plus
    ``lora_a (in, r)`` and ``lora_b (r, out)`` as ``nnx.LoRAParam``.

    Args:
      in_features: input features.
      out_features: output features.
      rank: LoRA rank ``r``.
      alpha: LoRA's alpha; scale ``alpha / r`` (``None``: scale 1).
      rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
      dropout_rate: dropout on the LoRA path's input (off under ``model.eval()``).
      a_init: ``"kaiming_uniform"`` (PEFT default), ``"gaussian"`` (std ``1/r``) or an
        initializer.
      b_init: initializer for ``b`` (zeros).
      lora_param_dtype: dtype of the factors (the forward pass promotes).
      rngs: random streams.
      **linear_kwargs: passed to ``nnx.Linear`` (``use_bias``, ``dtype``, ``param_dtype``...).

    Example:
      >>> from flax import nnx
      >>> import rplora_jax
      >>> layer = LoRALinear(4, 3, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
      >>> layer.lora_scaling, layer.lora_b.shape
      (2.0, (2, 3))
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(nnx.state(layer, nnx.LoRAParam))]
      ['lora_a']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout_rate: float = 0.0,
        a_init: AInit = "kaiming_uniform",
        b_init: Initializer = ZEROS,
        lora_param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        **linear_kwargs: Any,
    ):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self._init_lora(
            (in_features, rank),
            (rank, out_features),
            0,
            rank=rank,
            alpha=alpha,
            rslora=rslora,
            dropout_rate=dropout_rate,
            a_init=a_init,
            b_init=b_init,
            lora_param_dtype=lora_param_dtype,
            rngs=rngs,
        )

    @classmethod
    def from_linear(
        cls,
        base: nnx.Linear,
        *,
        rank: int = 8,
        lora_param_dtype: Dtype | None = None,
        rngs: nnx.Rngs,
        **lora_kwargs: Any,
    ) -> LoRALinear:
        """Wraps an existing ``nnx.Linear``, reusing its ``kernel``/``bias`` variables as the base.

        A kernel with extra leading axes (layers stacked by ``nnx.vmap``) gets factors stacked
        the same way.

        Args:
          base: the layer to extend; its variables are shared, not copied.
          rank: LoRA rank.
          lora_param_dtype: factor dtype; ``None`` uses ``base.param_dtype``.
          rngs: random streams for the factors.
          **lora_kwargs: ``alpha``, ``rslora``, ``dropout_rate``, ``a_init``, ``b_init``.

        Returns:
          A :class:`LoRALinear` whose output equals ``base``'s while ``b = 0``.
        """
        kernel = base.kernel[...]
        stack = tuple(kernel.shape[:-2])
        in_f, out_f = kernel.shape[-2:]
        options = _lora_defaults(lora_kwargs)
        factor_dtype = base.param_dtype if lora_param_dtype is None else lora_param_dtype
        new = cls(
            in_f,
            out_f,
            rank=rank,
            lora_param_dtype=factor_dtype,
            rngs=rngs,
            use_bias=base.use_bias,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=_reuse(kernel),
            bias_init=_reuse(base.bias[...] if base.use_bias else None),
            dot_general=base.dot_general,
            promote_dtype=base.promote_dtype,
            preferred_element_type=base.preferred_element_type,
            **options,
        )
        # Share the Variable objects themselves: their metadata (sharding...) is kept.
        new.kernel = base.kernel
        if base.use_bias:
            new.bias = base.bias
        if stack:
            # Stacked by nnx.vmap: each layer gets its own factors, initialised as one layer's.
            new._init_lora(
                (*stack, in_f, rank),
                (*stack, rank, out_f),
                len(stack),
                rank=rank,
                lora_param_dtype=factor_dtype,
                rngs=rngs,
                **options,
            )
        return new

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """Applies the layer; dropout on the LoRA path follows ``train()`` / ``eval()``."""
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self._lora_inputs(inputs, self.dtype)
        h = jnp.matmul(x, a, precision=self.precision)
        delta = jnp.matmul(h, b, precision=self.precision) * self.lora_scaling
        return y + delta.astype(y.dtype)

    def to_base(self) -> nnx.Linear:
        """A plain ``nnx.Linear`` with the LoRA term folded into its kernel (for serving)."""
        out = nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_reuse(self.kernel[...]),
            bias_init=_reuse(self.bias[...] if self.use_bias else None),
            dot_general=self.dot_general,
            promote_dtype=self.promote_dtype,
            preferred_element_type=self.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
        out.kernel = nnx.clone(self.kernel)
        out.kernel[...] = self.merged_kernel()
        if self.use_bias:
            out.bias = nnx.clone(self.bias)
        return out


def _lora_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"alpha", "rslora", "dropout_rate", "a_init", "b_init"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(
            f"Unknown LoRA options {sorted(unknown)}; expected some of {sorted(allowed)}."
        )
    out: dict[str, Any] = {
        "alpha": None,
        "rslora": False,
        "dropout_rate": 0.0,
        "a_init": "kaiming_uniform",
        "b_init": ZEROS,
    }
    out.update(kwargs)
    return out


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
      rank, alpha, rslora, dropout_rate, a_init, b_init, lora_param_dtype, rngs: as
        :class:`LoRALinear`.
      **einsum_kwargs: passed to ``nnx.Einsum``.

    Example:
      >>> from flax import nnx
      >>> layer = LoRAEinsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rank=2, rngs=nnx.Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape
      ((8, 2), (2, 2, 4))
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout_rate: float = 0.0,
        a_init: AInit = "kaiming_uniform",
        b_init: Initializer = ZEROS,
        lora_param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        **einsum_kwargs: Any,
    ):
        split = split_einsum(einsum_str, kernel_shape, rank, type(self).__name__)
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **einsum_kwargs)
        self._init_lora(
            split.a_shape,
            split.b_shape,
            split.n_shared,
            rank=rank,
            alpha=alpha,
            rslora=rslora,
            dropout_rate=dropout_rate,
            a_init=a_init,
            b_init=b_init,
            lora_param_dtype=lora_param_dtype,
            rngs=rngs,
        )
        self._set_split(split)

    def _set_split(self, split) -> None:
        self.lora_x_a, self.lora_h_b = split.x_a, split.h_b
        self.lora_shared_axes = split.n_shared

    def _kernel_ndim(self) -> int:
        return len(self.kernel_shape)

    def _shared_axes(self) -> int:
        return self.lora_shared_axes

    @classmethod
    def from_einsum(
        cls,
        base: nnx.Einsum,
        *,
        rank: int = 8,
        lora_param_dtype: Dtype | None = None,
        rngs: nnx.Rngs,
        **lora_kwargs: Any,
    ) -> LoRAEinsum:
        """Wraps an existing ``nnx.Einsum`` (see :meth:`LoRALinear.from_linear`).

        Args:
          base: the layer to extend; it must have its ``einsum_str`` set.
          rank: LoRA rank.
          lora_param_dtype: factor dtype; ``None`` uses ``base.param_dtype``.
          rngs: random streams for the factors.
          **lora_kwargs: ``alpha``, ``rslora``, ``dropout_rate``, ``a_init``, ``b_init``.

        Returns:
          A :class:`LoRAEinsum` whose output equals ``base``'s while ``b = 0``.
        """
        if base.einsum_str is None:
            raise ValueError("LoRAEinsum.from_einsum needs an nnx.Einsum built with einsum_str.")
        kernel = base.kernel[...]
        kernel_shape = tuple(base.kernel_shape)
        stack = tuple(kernel.shape[: kernel.ndim - len(kernel_shape)])
        split = split_einsum(base.einsum_str, kernel_shape, rank, cls.__name__)
        options = _lora_defaults(lora_kwargs)
        factor_dtype = base.param_dtype if lora_param_dtype is None else lora_param_dtype
        new = cls(
            base.einsum_str,
            kernel_shape,
            base.bias_shape,
            rank=rank,
            lora_param_dtype=factor_dtype,
            rngs=rngs,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=_reuse(kernel),
            bias_init=_reuse(None if base.bias is None else base.bias[...]),
            promote_dtype=base.promote_dtype,
            einsum_op=base.einsum_op,
            preferred_element_type=base.preferred_element_type,
            **options,
        )
        new.kernel = base.kernel
        if base.bias is not None:
            new.bias = base.bias
        if stack:
            new._init_lora(
                (*stack, *split.a_shape),
                (*stack, *split.b_shape),
                len(stack) + split.n_shared,
                rank=rank,
                lora_param_dtype=factor_dtype,
                rngs=rngs,
                **options,
            )
        return new

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding=None):
        """Applies the layer; ``einsum_str``, if given, must equal the constructor's."""
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(
                f"LoRAEinsum was built for {self.einsum_str!r}; its factors do not fit "
                f"{einsum_str!r}."
            )
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self._lora_inputs(inputs, self.dtype)
        h = jnp.einsum(self.lora_x_a, x, a, precision=self.precision)
        delta = jnp.einsum(self.lora_h_b, h, b, precision=self.precision) * self.lora_scaling
        return y + delta.astype(y.dtype)

    def to_base(self) -> nnx.Einsum:
        """A plain ``nnx.Einsum`` with the LoRA term folded into its kernel (for serving)."""
        out = nnx.Einsum(
            self.einsum_str,
            self.kernel_shape,
            self.bias_shape,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_reuse(self.kernel[...]),
            bias_init=_reuse(None if self.bias is None else self.bias[...]),
            promote_dtype=self.promote_dtype,
            einsum_op=self.einsum_op,
            preferred_element_type=self.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
        out.kernel = nnx.clone(self.kernel)
        out.kernel[...] = self.merged_kernel()
        if self.bias is not None:
            out.bias = nnx.clone(self.bias)
        return out


LORA_LAYERS = (LoRALinear, LoRAEinsum)


def get_child(parent: Any, key: Any) -> Any:
    """``parent.key`` or ``parent[key]``, as NNX paths index modules, lists and dicts."""
    if isinstance(parent, (Mapping, Sequence)) and not isinstance(parent, str):
        return parent[key]
    return getattr(parent, key)


def set_child(parent: Any, key: Any, value: Any) -> None:
    """Sets ``parent.key`` or ``parent[key]`` in place."""
    if isinstance(parent, (Mapping, MutableSequence)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA layer folded into a plain ``nnx.Linear``/``nnx.Einsum``.

    The copy has exactly the state of the model without LoRA (``kernel <- kernel + s * a @ b``);
    ``model`` itself is untouched, so training can continue from it.

    Args:
      model: an NNX module containing :class:`LoRALinear` / :class:`LoRAEinsum` layers.

    Returns:
      The merged copy.

    Example:
      >>> from flax import nnx
      >>> layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
      >>> type(merge(layer)).__name__
      'Linear'
    """
    out = nnx.clone(model)
    if isinstance(out, LORA_LAYERS):
        return out.to_base()
    found = [(p, m) for p, m in nnx.iter_modules(out) if p and isinstance(m, LORA_LAYERS)]
    for path, module in found:
        parent = out
        for key in path[:-1]:
            parent = get_child(parent, key)
        set_child(parent, path[-1], module.to_base())
    return out
