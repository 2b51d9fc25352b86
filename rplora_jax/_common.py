"""Pieces shared by the linen and NNX LoRA layers: scaling, initialisers and einsum splitting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
AInit = Literal["kaiming_uniform", "gaussian"] | Initializer
# Default for `b`: zero, so a fresh LoRA layer computes exactly what its base layer does.
ZEROS: Initializer = jax.nn.initializers.zeros

# Letters jnp.einsum accepts; the rank letter is picked among those the equation does not use.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def lora_scaling(rank: int, alpha: float | None = None, rslora: bool = False) -> float:
    """The factor ``s`` in ``y = x @ (W0 + s * a @ b)``.

    Args:
      rank: the LoRA rank ``r``.
      alpha: LoRA's alpha. ``None`` means ``s = 1``.
      rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023) instead of
        ``alpha / r``.

    Returns:
      The scale as a Python float.

    Example:
      >>> lora_scaling(8, 16.0), lora_scaling(16, 16.0, rslora=True)
      (2.0, 4.0)
    """
    check_rank(rank, "lora_scaling")
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def check_rank(rank: Any, where: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: rank must be a positive int, got {rank!r}.")


def check_dropout(rate: Any, where: str) -> None:
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{where}: dropout_rate must be in [0, 1), got {rate!r}.")


def a_initializer(a_init: AInit, rank: int, n_stack: int = 0) -> Initializer:
    """Resolves the ``a_init`` option to an initialiser for ``a: (*stack, *in, r)``.

    ``"kaiming_uniform"`` is PEFT's default, ``kaiming_uniform_(a=sqrt(5))``: uniform in
    ``+-1/sqrt(fan_in)`` with ``fan_in`` the product of the input axes. ``"gaussian"`` is PEFT's
    ``init_lora_weights="gaussian"``: normal with standard deviation ``1/r``. A callable is used as
    is, with the usual ``(key, shape, dtype)`` signature.
    """
    if callable(a_init):
        return a_init
    if a_init == "gaussian":
        return jax.nn.initializers.normal(stddev=1.0 / rank)
    if a_init == "kaiming_uniform":

        def init(key, shape, dtype=jnp.float32):
            # Every axis but the stack and the rank is an input axis.
            in_axes = tuple(range(n_stack, len(shape) - 1))
            return jax.nn.initializers.variance_scaling(
                1.0 / 3.0,
                "fan_in",
                "uniform",
                in_axis=in_axes,
                out_axis=-1,
                batch_axis=tuple(range(n_stack)),
            )(key, shape, dtype)

        return init
    raise ValueError(
        f"a_init must be 'kaiming_uniform', 'gaussian' or an initializer, got {a_init!r}."
    )


@dataclasses.dataclass(frozen=True)
class EinsumSplit:
    """How ``x, kernel -> y`` becomes ``x, a -> h`` then ``h, b -> y``.

    The kernel's axes must be ordered ``[shared][contracted][output]``: shared axes appear in
    the input, the kernel and the output (e.g. experts), contracted ones only in the input and
    kernel, output ones only in the kernel and output. Then ``a: (*shared, *contracted, r)``,
    ``b: (*shared, r, *output)`` and ``tensordot(a, b)`` over ``r`` (batched over the shared axes)
    has exactly the kernel's shape and axis order, which is what :func:`rplora_jax.merge` relies
    on, and the pairing sees the shared axes as stacked layers.
    """

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    x_a: str
    h_b: str
    n_shared: int


def split_einsum(einsum_str: str, kernel_shape: Sequence[int], rank: int, where: str):
    """Splits a two-operand einsum ``inputs, kernel -> out`` into the two LoRA einsums.

    Args:
      einsum_str: the layer's equation, e.g. ``"BTD,DNH->BTNH"``.
      kernel_shape: the kernel's shape (without stacked-layer axes).
      rank: the LoRA rank.
      where: module path or class name for error messages.

    Returns:
      An :class:`EinsumSplit`.
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
    return EinsumSplit(
        a_shape=(*shape[: n_shared + n_contract], rank),
        b_shape=(*shape[:n_shared], rank, *shape[n_shared + n_contract :]),
        x_a=f"{x_spec},{shared}{contracted}{r}->{h_spec}",
        h_b=f"{h_spec},{shared}{r}{output}->{out}",
        n_shared=n_shared,
    )


def fold_delta(a: jax.Array, b: jax.Array, n_batch: int, precision=jax.lax.Precision.HIGHEST):
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
