"""Flax linen LoRA layers: drop-in ``Dense``, ``DenseGeneral`` and ``Einsum`` with LoRA factors.

Each layer computes ``y = x @ W0 + bias + s * dropout(x) @ a @ b`` and stores its parameters as
siblings ``kernel``, ``bias``, ``lora_a``, ``lora_b`` in one module, so

* a pretrained ``nn.Dense`` checkpoint loads unchanged (same ``kernel``/``bias`` names and
  shapes), and
* the default pairing of :func:`rplora_jax.riemannian_preconditioner` finds every pair, also when
  the layer is stacked by ``nn.scan`` (the stacked axis is inferred).

Factor layout (Flax layout)::

    a: (*in_axes, r)      b: (r, *out_axes)

with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora=True``; ``alpha=None`` gives
``s = 1``). ``b`` starts at zero, so a fresh layer computes exactly what its base layer does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from rplora_jax._common import (
    ZEROS,
    AInit,
    Initializer,
    a_initializer,
    check_dropout,
    check_rank,
    lora_scaling,
    split_einsum,
)

Dtype = Any
PrecisionLike = Any

default_kernel_init = nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA options shared by the linen layers and :func:`rplora_jax.inject.inject_linen`.

    Attributes:
      rank: the LoRA rank ``r``.
      alpha: LoRA's alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        ``None`` gives scale 1.
      rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
      dropout_rate: dropout on the LoRA path's input (PEFT's ``lora_dropout``).
      a_init: ``"kaiming_uniform"`` (PEFT's default), ``"gaussian"`` (std ``1/r``) or an
        initializer for ``a``.
      b_init: initializer for ``b``; zeros so that training starts at the base model.
      param_dtype: dtype of the factors; ``None`` uses the base layer's ``param_dtype``. The
        forward pass promotes, so bf16 factors on a float32 base compute in float32.
    """

    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout_rate: float = 0.0
    a_init: AInit = "kaiming_uniform"
    b_init: Initializer = ZEROS
    param_dtype: Dtype | None = None

    def __post_init__(self):
        check_rank(self.rank, "LoRAConfig")
        check_dropout(self.dropout_rate, "LoRAConfig")
        a_initializer(self.a_init, self.rank)  # validates the option

    @property
    def scaling(self) -> float:
        """``s`` in ``W0 + s * a @ b``."""
        return lora_scaling(self.rank, self.alpha, self.rslora)


def _lora_input(module: nn.Module, x: jax.Array, cfg: LoRAConfig, deterministic: bool) -> jax.Array:
    if cfg.dropout_rate == 0.0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - cfg.dropout_rate), jnp.zeros_like(x))


def _factors(module: nn.Module, cfg: LoRAConfig, a_shape, b_shape, base_param_dtype, n_stack=0):
    dtype = base_param_dtype if cfg.param_dtype is None else cfg.param_dtype
    a = module.param("lora_a", a_initializer(cfg.a_init, cfg.rank, n_stack), a_shape, dtype)
    b = module.param("lora_b", cfg.b_init, b_shape, dtype)
    return a, b


def dense_delta(
    module: nn.Module,
    x: jax.Array,
    axis: Sequence[int],
    features: Sequence[int],
    cfg: LoRAConfig,
    *,
    deterministic: bool,
    dtype: Dtype | None,
    base_param_dtype: Dtype,
    precision: PrecisionLike = None,
) -> jax.Array:
    """The LoRA term ``s * x @ a @ b`` of a (general) dense layer, creating ``a``/``b`` on module.

    Args:
      module: the bound module that owns the factors (they become its ``lora_a``/``lora_b``).
      x: the layer's input.
      axis: normalised input axes contracted by the layer.
      features: the output feature shape.
      cfg: LoRA options.
      deterministic: disables the LoRA dropout.
      dtype: computation dtype (``None`` promotes the inputs).
      base_param_dtype: the base layer's ``param_dtype``.
      precision: ``jax.lax`` precision of both products.

    Returns:
      The term, shaped like the base layer's output.
    """
    in_shape = tuple(x.shape[ax] for ax in axis)
    a, b = _factors(module, cfg, (*in_shape, cfg.rank), (cfg.rank, *features), base_param_dtype)
    x = _lora_input(module, x, cfg, deterministic)
    x, a, b = promote_dtype(x, a, b, dtype=dtype)
    h = jax.lax.dot_general(
        x, a, ((tuple(axis), tuple(range(len(axis)))), ((), ())), precision=precision
    )
    delta = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)
    return delta * jnp.asarray(cfg.scaling, delta.dtype)


def einsum_delta(
    module: nn.Module,
    x: jax.Array,
    einsum_str: str,
    kernel_shape: Sequence[int],
    cfg: LoRAConfig,
    *,
    deterministic: bool,
    dtype: Dtype | None,
    base_param_dtype: Dtype,
    precision: PrecisionLike = None,
    where: str = "LoRAEinsum",
) -> jax.Array:
    """The LoRA term of an einsum layer; see :func:`dense_delta` and ``_common.split_einsum``."""
    split = split_einsum(einsum_str, kernel_shape, cfg.rank, where)
    a, b = _factors(module, cfg, split.a_shape, split.b_shape, base_param_dtype, split.n_shared)
    x = _lora_input(module, x, cfg, deterministic)
    x, a, b = promote_dtype(x, a, b, dtype=dtype)
    h = jnp.einsum(split.x_a, x, a, precision=precision)
    delta = jnp.einsum(split.h_b, h, b, precision=precision)
    return delta * jnp.asarray(cfg.scaling, delta.dtype)


class _LoRAMixin:
    """Methods common to the LoRA layers; their fields mirror :class:`LoRAConfig`."""

    rank: int
    alpha: float | None
    rslora: bool
    dropout_rate: float
    deterministic: bool | None
    a_init: AInit
    b_init: Initializer
    lora_param_dtype: Dtype | None

    def _config(self) -> LoRAConfig:
        return LoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            rslora=self.rslora,
            dropout_rate=self.dropout_rate,
            a_init=self.a_init,
            b_init=self.b_init,
            param_dtype=self.lora_param_dtype,
        )

    def _deterministic(self, deterministic: bool | None) -> bool:
        if self.dropout_rate == 0.0:
            return True
        return nn.merge_param("deterministic", self.deterministic, deterministic)

    @property
    def scaling(self) -> float:
        """``s`` in ``W0 + s * a @ b``."""
        return lora_scaling(self.rank, self.alpha, self.rslora)


def _kernel_init_flat(init: Initializer, n_in: int, n_out: int) -> Initializer:
    # As nn.DenseGeneral: initialise the (prod(in), prod(out)) matrix and reshape, so fan-in and
    # fan-out (and hence the values, for one key) match the layer this one replaces.
    def wrapped(key, shape, dtype=jnp.float32):
        flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in : n_in + n_out])))
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped


class LoRADenseGeneral(_LoRAMixin, nn.Module):
    """``nn.DenseGeneral`` with a LoRA term: ``y = x . W0 + bias + s * x . a . b``.

    Same ``kernel`` (``(*in, *features)``) and ``bias`` (``features``) as ``nn.DenseGeneral``
    (``batch_dims`` is not supported), plus ``lora_a: (*in, r)`` and ``lora_b: (r, *features)``.

    Attributes:
      features: int or tuple of output features.
      axis: input axes to contract.
      rank: LoRA rank.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.DenseGeneral``.
      alpha, rslora, dropout_rate, deterministic, a_init, b_init, lora_param_dtype: see
        :class:`LoRAConfig` (``lora_param_dtype`` is its ``param_dtype``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LoRADenseGeneral(features=(2, 3), axis=-1, rank=2)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 5)))
      >>> jax.tree.map(jnp.shape, variables["params"])["lora_b"]
      (2, 2, 3)
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    a_init: AInit = "kaiming_uniform"
    b_init: Initializer = ZEROS
    lora_param_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: input array.
          deterministic: if False, apply dropout on the LoRA path (needs a ``"dropout"`` rng).

        Returns:
          The output, shaped ``inputs`` without ``axis`` plus ``features``.
        """
        features = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
        axis = tuple(self.axis) if isinstance(self.axis, Sequence) else (self.axis,)
        axis = tuple(sorted(ax % inputs.ndim for ax in axis))
        in_shape = tuple(inputs.shape[ax] for ax in axis)
        kernel = self.param(
            "kernel",
            _kernel_init_flat(self.kernel_init, len(in_shape), len(features)),
            in_shape + features,
            self.param_dtype,
        )
        bias = None
        if self.use_bias:

            def bias_init(key, shape, dtype=jnp.float32):
                return jnp.reshape(self.bias_init(key, (int(np.prod(shape)),), dtype), shape)

            bias = self.param("bias", bias_init, features, self.param_dtype)
        x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(
            x, kernel, ((axis, tuple(range(len(axis)))), ((), ())), precision=self.precision
        )
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - len(features)) + features)
        delta = dense_delta(
            self,
            inputs,
            axis,
            features,
            self._config(),
            deterministic=self._deterministic(deterministic),
            dtype=self.dtype,
            base_param_dtype=self.param_dtype,
            precision=self.precision,
        )
        return y + delta.astype(y.dtype)


class LoRADense(_LoRAMixin, nn.Module):
    """Drop-in ``nn.Dense`` with a LoRA term: ``y = x @ W0 + bias + s * dropout(x) @ a @ b``.

    Parameters: ``kernel: (in, features)`` and ``bias: (features,)`` exactly as ``nn.Dense`` (so
    its pretrained weights load unchanged), plus ``lora_a: (in, r)`` and ``lora_b: (r, features)``.

    Attributes:
      features: number of output features.
      rank: LoRA rank.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Dense``.
      alpha, rslora, dropout_rate, deterministic, a_init, b_init, lora_param_dtype: see
        :class:`LoRAConfig` (``lora_param_dtype`` is its ``param_dtype``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> layer = LoRADense(features=3, rank=2, alpha=4.0)
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
      >>> sorted(params), layer.scaling
      (['bias', 'kernel', 'lora_a', 'lora_b'], 2.0)
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(params)]
      ['lora_a']
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    a_init: AInit = "kaiming_uniform"
    b_init: Initializer = ZEROS
    lora_param_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: input array, features on the last axis.
          deterministic: if False, apply dropout on the LoRA path (needs a ``"dropout"`` rng).

        Returns:
          ``inputs.shape[:-1] + (features,)``.
        """
        kernel = self.param(
            "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(
            x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        delta = dense_delta(
            self,
            inputs,
            (inputs.ndim - 1,),
            (self.features,),
            self._config(),
            deterministic=self._deterministic(deterministic),
            dtype=self.dtype,
            base_param_dtype=self.param_dtype,
            precision=self.precision,
        )
        return y + delta.astype(y.dtype)


def einsum_bias_shapes(einsum_str: str, x_ndim: int, kernel_shape: Sequence[int]):
    """``(bias_shape, broadcast_shape)`` of an einsum layer's bias, as ``nn.Einsum`` makes it."""
    lhs, out = einsum_str.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    n_ellipsis = x_ndim - (len(x_spec) - 3) if "..." in x_spec else 0
    sizes = dict(zip(k_spec, kernel_shape, strict=True))
    broadcast: list[int] = []
    for token in out.replace("...", "."):
        if token == ".":
            broadcast.extend([1] * n_ellipsis)
        else:
            broadcast.append(int(sizes.get(token, 1)))
    bias = [int(sizes[c]) for c in out if c in sizes]
    return tuple(bias), tuple(broadcast)


class LoRAEinsum(_LoRAMixin, nn.Module):
    """``nn.Einsum`` with a LoRA term.

    For ``einsum_str = "x_spec,k_spec->out"`` the kernel axes must be ordered
    ``[shared][contracted][output]`` (shared: in the input and the output too, e.g. experts;
    e.g. ``"BTD,DNH->BTNH"``, ``"BTNH,NHD->BTD"``, ``"EBD,EDF->EBF"``). The factors are
    ``lora_a: (*shared, *contracted, r)`` and ``lora_b: (*shared, r, *output)``; the pairing sees
    the shared axes as stacked, so each expert gets its own preconditioner.

    Attributes:
      shape: kernel shape.
      einsum_str: the equation (or pass it to ``__call__``).
      rank: LoRA rank.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Einsum``.
      alpha, rslora, dropout_rate, deterministic, a_init, b_init, lora_param_dtype: see
        :class:`LoRAConfig`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LoRAEinsum(shape=(8, 2, 4), einsum_str="btd,dnh->btnh", rank=2)
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))["params"]
      >>> params["lora_a"].shape, params["lora_b"].shape
      ((8, 2), (2, 2, 4))
    """

    shape: Sequence[int]
    einsum_str: str | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    a_init: AInit = "kaiming_uniform"
    b_init: Initializer = ZEROS
    lora_param_dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        einsum_str: str | None = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: input array.
          einsum_str: the equation, if not given as an attribute.
          deterministic: if False, apply dropout on the LoRA path (needs a ``"dropout"`` rng).

        Returns:
          The einsum's output.
        """
        eq = nn.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
        kernel = self.param("kernel", self.kernel_init, tuple(self.shape), self.param_dtype)
        bias = None
        if self.use_bias:
            bias_shape, broadcast = einsum_bias_shapes(eq, inputs.ndim, self.shape)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jnp.einsum(eq, x, kernel, precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, broadcast)
        delta = einsum_delta(
            self,
            inputs,
            eq,
            self.shape,
            self._config(),
            deterministic=self._deterministic(deterministic),
            dtype=self.dtype,
            base_param_dtype=self.param_dtype,
            precision=self.precision,
            where=f"LoRAEinsum '{'/'.join(self.scope.path) if self.scope else ''}'",
        )
        return y + delta.astype(y.dtype)
