"""Flax linen LoRA layers: ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` plus a LoRA term.

Each layer subclasses the Flax layer it extends and adds ``s * dropout(x) @ a @ b`` to its output,
so ``kernel`` and ``bias`` keep their names, shapes and initial values (a pretrained checkpoint
loads unchanged) and ``lora_a``/``lora_b`` sit next to them, where the default pairing of
[`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner] finds them, also
under ``nn.scan``. Factor layout::

    a: (*in_axes, r)      b: (r, *out_axes)

`_lora_delta` computes the LoRA term of any of the three Flax layers; the layers here and
[`inject_linen`][rplora_jax.layers.inject.inject_linen] both use it. The options are one
[`LoRAConfig`][rplora_jax.layers.config.LoRAConfig].
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from rplora_jax.layers.config import LoRAConfig, _check_lora, _split_einsum

_LINEN_LINEAR = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _dropout(module: nn.Module, x: jax.Array, config: LoRAConfig, deterministic: bool):
    if config.dropout_rate == 0.0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - config.dropout_rate), jnp.zeros_like(x))


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _module_path(module: nn.Module) -> str:
    """A bound module's ``/``-joined path, or its class name at the top level."""
    path = "/".join(module.scope.path) if module.scope is not None else ""
    return path or type(module).__name__


def _factors(module: nn.Module, config: LoRAConfig, a_shape, b_shape, n_stack: int = 0):
    """Creates (at init) or reads ``lora_a``/``lora_b`` in ``module``'s scope."""
    dtype = config.factor_dtype(module.param_dtype)
    try:
        a = module.param("lora_a", config.a_initializer(n_stack), a_shape, dtype)
    except flax.errors.NameInUseError as err:
        # Flax raises this when a second LoRA term is added within the same call.
        raise ValueError(
            f"'{_module_path(module)}' already has LoRA factors (lora_a/lora_b): LoRA was added "
            "to it twice (a LoRA layer matched by inject_linen, or a model injected again). Inject "
            "into the original model, or narrow the target regex."
        ) from err
    b = module.param("lora_b", config.b_initializer(n_stack), b_shape, dtype)
    return a, b


def _lora_delta(
    module: nn.Module,
    inputs: jax.Array,
    config: LoRAConfig,
    *,
    deterministic: bool = True,
    einsum_str: str | None = None,
) -> jax.Array:
    """The LoRA term ``s * dropout(x) @ a @ b`` of a bound ``nn.Dense``/``DenseGeneral``/``Einsum``.

    Creates ``lora_a``/``lora_b`` in ``module``'s scope (next to its ``kernel``) at init.

    Args:
      module: the bound Flax layer whose kernel gets the low-rank update.
      inputs: the layer's input.
      config: LoRA options.
      deterministic: disables the LoRA dropout.
      einsum_str: for ``nn.Einsum`` called with its equation as an argument.

    Returns:
      The term, shaped like the layer's output.
    """
    if isinstance(module, nn.Einsum):
        return _einsum_delta(module, inputs, config, deterministic, einsum_str)
    if isinstance(module, nn.Dense):
        axis, features = (inputs.ndim - 1,), (module.features,)
    elif isinstance(module, nn.DenseGeneral):
        if _as_tuple(module.batch_dims):
            raise ValueError(
                f"LoRA on '{_module_path(module)}': nn.DenseGeneral with batch_dims="
                f"{module.batch_dims} is not supported."
            )
        axis = tuple(sorted(ax % inputs.ndim for ax in _as_tuple(module.axis)))
        features = _as_tuple(module.features)
    else:
        raise TypeError(
            f"LoRA on '{_module_path(module)}': expected nn.Dense, nn.DenseGeneral or nn.Einsum, "
            f"got {type(module).__name__}."
        )
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    a, b = _factors(module, config, (*in_shape, config.rank), (config.rank, *features))
    x = _dropout(module, inputs, config, deterministic)
    x, a, b = promote_dtype(x, a, b, dtype=module.dtype)
    h = jax.lax.dot_general(
        x, a, ((axis, tuple(range(len(axis)))), ((), ())), precision=module.precision
    )
    delta = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    return delta * jnp.asarray(config.scale, delta.dtype)


def _einsum_delta(module, inputs, config, deterministic, einsum_str):
    eq = module.einsum_str if module.einsum_str is not None else einsum_str
    if eq is None:
        raise ValueError(f"LoRA on '{_module_path(module)}': the nn.Einsum has no einsum_str.")
    split = _split_einsum(eq, module.shape, config.rank, f"LoRA on '{_module_path(module)}'")
    a, b = _factors(module, config, split.a_shape, split.b_shape, split.n_shared)
    x = _dropout(module, inputs, config, deterministic)
    x, a, b = promote_dtype(x, a, b, dtype=module.dtype)
    h = jnp.einsum(split.x_a, x, a, precision=module.precision)
    delta = jnp.einsum(split.h_b, h, b, precision=module.precision)
    return delta * jnp.asarray(config.scale, delta.dtype)


class _LoRAMixin:
    lora: LoRAConfig
    deterministic: bool | None

    def _add_lora(self, y: jax.Array, inputs: jax.Array, deterministic: bool | None, **kw):
        """``y`` (the base layer's output) plus the LoRA term, in y's dtype."""
        _check_lora(self.lora, f"{type(self).__name__} '{_module_path(self)}' (lora=)")
        det = self.lora.dropout_rate == 0.0 or nn.merge_param(
            "deterministic", self.deterministic, deterministic
        )
        return y + _lora_delta(self, inputs, self.lora, deterministic=det, **kw).astype(y.dtype)


class LoRADense(_LoRAMixin, nn.Dense):
    """``nn.Dense`` plus a LoRA term: ``y = x @ W0 + bias + s * dropout(x) @ a @ b``.

    Parameters ``kernel: (in, features)`` and ``bias: (features,)`` are ``nn.Dense``'s (same
    initial values for the same key), plus ``lora_a: (in, r)`` and ``lora_b: (r, features)``.

    Attributes:
      lora: the LoRA options.
      deterministic: default for ``__call__``'s ``deterministic`` (LoRA dropout off when True).
      features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init...: as
        ``nn.Dense``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> layer = LoRADense(features=3, lora=rplora_jax.LoRAConfig(rank=2, alpha=4.0))
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
      >>> sorted(params), layer.lora.scale
      (['bias', 'kernel', 'lora_a', 'lora_b'], 2.0)
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(params)]
      ['lora_a']
    """

    lora: LoRAConfig = LoRAConfig()
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Applies the layer; ``deterministic=False`` applies LoRA dropout (``"dropout"`` rng)."""
        return self._add_lora(super().__call__(inputs), inputs, deterministic)


class LoRADenseGeneral(_LoRAMixin, nn.DenseGeneral):
    """``nn.DenseGeneral`` plus a LoRA term; ``lora_a: (*in, r)``, ``lora_b: (r, *features)``.

    ``batch_dims`` is not supported.

    Attributes:
      lora: the LoRA options.
      deterministic: default for ``__call__``'s ``deterministic``.
      features, axis, use_bias, dtype, param_dtype, precision, kernel_init, bias_init...: as
        ``nn.DenseGeneral``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> layer = LoRADenseGeneral(features=(2, 3), lora=rplora_jax.LoRAConfig(rank=2))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 5)))
      >>> jax.tree.map(jnp.shape, variables["params"])["lora_b"]
      (2, 2, 3)
    """

    lora: LoRAConfig = LoRAConfig()
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Applies the layer; ``deterministic=False`` applies LoRA dropout (``"dropout"`` rng)."""
        return self._add_lora(super().__call__(inputs), inputs, deterministic)


class LoRAEinsum(_LoRAMixin, nn.Einsum):
    """``nn.Einsum`` plus a LoRA term.

    For ``einsum_str = "x_spec,k_spec->out"`` the kernel axes must be ordered
    ``[shared][contracted][output]`` (shared: in the input and the output too, e.g. experts;
    e.g. ``"BTD,DNH->BTNH"``, ``"BTNH,NHD->BTD"``, ``"EBD,EDF->EBF"``). The factors are
    ``lora_a: (*shared, *contracted, r)`` and ``lora_b: (*shared, r, *output)``; the pairing sees
    the shared axes as stacked, so each expert gets its own preconditioner.

    Attributes:
      lora: the LoRA options.
      deterministic: default for ``__call__``'s ``deterministic``.
      shape, einsum_str, use_bias, dtype, param_dtype, precision, kernel_init...: as
        ``nn.Einsum``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import rplora_jax
      >>> layer = LoRAEinsum(shape=(8, 2, 4), einsum_str="btd,dnh->btnh",
      ...                    lora=rplora_jax.LoRAConfig(rank=2))
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))["params"]
      >>> params["lora_a"].shape, params["lora_b"].shape
      ((8, 2), (2, 2, 4))
    """

    lora: LoRAConfig = LoRAConfig()
    deterministic: bool | None = None

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        einsum_str: str | None = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        """Applies the layer; ``deterministic=False`` applies LoRA dropout (``"dropout"`` rng)."""
        y = super().__call__(inputs, einsum_str)
        return self._add_lora(y, inputs, deterministic, einsum_str=einsum_str)


_LINEN_LORA = (LoRADense, LoRADenseGeneral, LoRAEinsum)
