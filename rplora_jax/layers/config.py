"""The one LoRA configuration, and what the linen and NNX layers share: initialisers and the
einsum split.

Needs only JAX: importing it does not import Flax.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

_Initializer = Callable[..., jax.Array]
_AInit = Literal["kaiming_uniform", "gaussian"] | _Initializer
# Default for `b`: zero, so a fresh LoRA layer computes exactly what its base layer does.
_ZEROS: _Initializer = jax.nn.initializers.zeros

# Letters jnp.einsum accepts; the rank letter is picked among those the equation does not use.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _per_layer(init: _Initializer, n_stack: int) -> _Initializer:
    """``init`` applied to each of the stacked layers in the ``n_stack`` leading axes, with its
    own key: a fan-in-based initializer then sees one layer's shape, not the stack's."""
    if not n_stack:
        return init

    def stacked(key, shape, dtype=jnp.float32):
        stack = tuple(shape[:n_stack])
        keys = jax.random.split(key, math.prod(stack))
        layers = jax.vmap(lambda k: init(k, tuple(shape[n_stack:]), dtype))(keys)
        return layers.reshape(shape)

    return stacked


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA options, shared by the linen layers, the NNX layers and injection.

    A layer computes ``y = x @ W0 + bias + scale * dropout(x) @ a @ b`` with factors in Flax
    layout, ``a: (*in, rank)`` and ``b: (rank, *out)``.

    Attributes:
      rank: the LoRA rank ``r``.
      alpha: LoRA's alpha: ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
        ``None`` gives ``scale = 1``.
      rslora: use the rank-stabilised scale ``alpha / sqrt(rank)`` (Kalajdzievski, 2023).
      dropout_rate: dropout on the LoRA path's input (PEFT's ``lora_dropout``).
      a_init: ``"kaiming_uniform"`` (PEFT's default: uniform in ``+-1/sqrt(fan_in)``),
        ``"gaussian"`` (PEFT's ``init_lora_weights="gaussian"``: normal with std ``1/rank``) or
        an initializer ``(key, shape, dtype) -> array``.
      b_init: initializer for ``b``; zeros, so training starts at the base model.
      param_dtype: dtype of the factors; ``None`` uses the base layer's ``param_dtype``. The
        LoRA term runs in the layer's ``dtype`` if set, else in the promoted dtype of the input
        and the factors: bfloat16 factors compute in float32 with float32 inputs, and in
        bfloat16 with bfloat16 inputs.

    Examples:
      >>> LoRAConfig(rank=8, alpha=16.0).scale, LoRAConfig(16, 16.0, rslora=True).scale
      (2.0, 4.0)
    """

    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout_rate: float = 0.0
    a_init: _AInit = "kaiming_uniform"
    b_init: _Initializer = _ZEROS
    param_dtype: Any = None

    def __post_init__(self):
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LoRAConfig: rank must be a positive int, got {rank!r}.")
        object.__setattr__(self, "rank", int(rank))  # numpy ints become plain ints
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)
        ):
            raise ValueError(f"LoRAConfig: alpha must be a number or None, got {self.alpha!r}.")
        rate = self.dropout_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(f"LoRAConfig: dropout_rate must be in [0, 1), got {rate!r}.")
        if self.rslora and self.alpha is None:
            raise ValueError(
                "LoRAConfig: rslora=True scales by alpha / sqrt(rank) and needs alpha; with "
                "alpha=None the scale is 1 whatever the rank."
            )
        if not callable(self.b_init):
            raise ValueError(f"LoRAConfig: b_init must be an initializer, got {self.b_init!r}.")
        self.a_initializer()  # validates a_init

    @property
    def scale(self) -> float:
        """``s`` in ``W0 + s * a @ b``."""
        if self.alpha is None:
            return 1.0
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

    def factor_dtype(self, base_param_dtype: Any) -> Any:
        """The factors' dtype for a base layer whose parameters have ``base_param_dtype``."""
        return base_param_dtype if self.param_dtype is None else self.param_dtype

    def b_initializer(self, n_stack: int = 0) -> _Initializer:
        """The initializer of ``b: (*stack, r, *out)``: ``b_init`` per stacked layer."""
        return _per_layer(self.b_init, n_stack)

    def a_initializer(self, n_stack: int = 0) -> _Initializer:
        """The initializer of ``a: (*stack, *in, r)``: fan-in is the product of the input axes.

        Args:
          n_stack: leading axes that are independent stacked layers (not fan-in).

        Returns:
          An initializer ``(key, shape, dtype) -> array``.
        """
        if callable(self.a_init):
            return _per_layer(self.a_init, n_stack)
        if self.a_init == "gaussian":
            return jax.nn.initializers.normal(stddev=1.0 / self.rank)
        if self.a_init == "kaiming_uniform":

            def init(key, shape, dtype=jnp.float32):
                # PEFT's kaiming_uniform_(a=sqrt(5)): variance 1/(3 fan_in), uniform.
                return jax.nn.initializers.variance_scaling(
                    1.0 / 3.0,
                    "fan_in",
                    "uniform",
                    in_axis=tuple(range(n_stack, len(shape) - 1)),
                    out_axis=-1,
                    batch_axis=tuple(range(n_stack)),
                )(key, shape, dtype)

            return init
        raise ValueError(
            "LoRAConfig: a_init must be 'kaiming_uniform', 'gaussian' or an initializer, got "
            f"{self.a_init!r}."
        )


def _check_lora(lora: Any, where: str) -> LoRAConfig:
    """``lora`` itself, or a ``TypeError`` saying that ``where`` needs a
    [`LoRAConfig`][rplora_jax.layers.config.LoRAConfig]."""
    if not isinstance(lora, LoRAConfig):
        raise TypeError(
            f"{where}: expected a rplora_jax.LoRAConfig (e.g. LoRAConfig(rank=8, alpha=16.0)), "
            f"got {lora!r}."
        )
    return lora


@dataclasses.dataclass(frozen=True)
class _EinsumSplit:
    """How ``x, kernel -> y`` becomes ``x, a -> h`` then ``h, b -> y``.

    The kernel's axes must be ordered ``[shared][contracted][output]``: shared axes appear in the
    input, the kernel and the output (e.g. experts), contracted ones only in the input and kernel,
    output ones only in the kernel and output. Then ``a: (*shared, *contracted, r)``, ``b: (*shared,
    r, *output)`` and ``tensordot(a, b)`` over ``r`` (batched over the shared axes) has exactly the
    kernel's shape and axis order, which is what [`merge`][rplora_jax.merge.merge] relies on, and
    the pairing sees the shared axes as stacked layers.
    """

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    x_a: str
    h_b: str
    n_shared: int


def _split_einsum(einsum_str: str, kernel_shape: Sequence[int], rank: int, where: str):
    """Splits a two-operand einsum ``inputs, kernel -> out`` into the two LoRA einsums.

    Args:
      einsum_str: the layer's equation, e.g. ``"BTD,DNH->BTNH"``.
      kernel_shape: the kernel's shape (without stacked-layer axes).
      rank: the LoRA rank.
      where: module path or class name for error messages.

    Returns:
      An `_EinsumSplit`.
    """
    eq = einsum_str.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(
            f"{where}: LoRA needs an explicit two-operand einsum 'x,kernel->out', got {eq!r}."
        )
    lhs, out = eq.split("->")
    x_spec, k_spec = lhs.split(",")
    if "." in k_spec:
        raise ValueError(f"{where}: the kernel spec {k_spec!r} of {eq!r} may not use '...'.")
    if len(k_spec) != len(kernel_shape) or len(set(k_spec)) != len(k_spec):
        raise ValueError(
            f"{where}: kernel spec {k_spec!r} of {eq!r} does not fit kernel shape "
            f"{tuple(kernel_shape)}."
        )
    x_letters, out_letters = set(x_spec), set(out)
    roles = []
    for c in k_spec:
        if c in x_letters and c in out_letters:
            roles.append(0)  # shared
        elif c in x_letters:
            roles.append(1)  # contracted
        elif c in out_letters:
            roles.append(2)  # output
        else:
            raise ValueError(
                f"{where}: kernel axis {c!r} of {eq!r} is in neither the input nor the output; "
                "LoRA cannot factor such a kernel."
            )
    if roles != sorted(roles) or 1 not in roles or 2 not in roles:
        raise ValueError(
            f"{where}: LoRA on an einsum needs the kernel axes ordered [shared][contracted]"
            f"[output] with at least one contracted and one output axis; {eq!r} has kernel "
            f"{k_spec!r} with roles {[('shared', 'contracted', 'output')[r] for r in roles]}. "
            "Reorder the kernel's axes in the equation (e.g. 'BTD,SNDH->SBTNH' as "
            "'BTD,DSNH->SBTNH')."
        )
    n_shared, n_contract = roles.count(0), roles.count(1)
    r = next(c for c in _LETTERS if c not in eq)
    shared, contracted, output = (
        k_spec[:n_shared],
        k_spec[n_shared : n_shared + n_contract],
        k_spec[n_shared + n_contract :],
    )
    h_spec = "".join(c for c in x_spec if c not in contracted) + r
    shape = tuple(int(d) for d in kernel_shape)
    return _EinsumSplit(
        a_shape=(*shape[: n_shared + n_contract], rank),
        b_shape=(*shape[:n_shared], rank, *shape[n_shared + n_contract :]),
        x_a=f"{x_spec},{shared}{contracted}{r}->{h_spec}",
        h_b=f"{h_spec},{shared}{r}{output}->{out}",
        n_shared=n_shared,
    )
