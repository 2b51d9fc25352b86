"""What the BERT and Llama ports share: LoRA injection on named projections and loading
converted pretrained tensors into a model's parameter tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

import rplora_jax
from rplora_jax.layers.inject import LinenLoRA

Params = dict[str, Any]


def as_key(rng: jax.Array | int) -> jax.Array:
    """A PRNG key from a key or a seed."""
    return jax.random.key(rng) if isinstance(rng, int) else rng


def targets_regex(names: Sequence[str], allowed: Sequence[str], template: str) -> str:
    """``template`` with ``{}`` replaced by ``(n1|n2|...)``, after checking ``names``.

    Raises:
      ValueError: ``names`` is empty or not a subset of ``allowed``.
    """
    names = tuple(names)
    if not names or any(n not in allowed for n in names):
        raise ValueError(
            f"LoRA targets {list(names)} must be a non-empty subset of {list(allowed)}."
        )
    return template.format(f"({'|'.join(names)})")


def add_lora(
    model: nn.Module,
    params: Params,
    lora: rplora_jax.LoRAConfig,
    targets: str,
    rng: jax.Array | int,
    example_inputs: Sequence[jax.Array],
) -> tuple[LinenLoRA, Params]:
    """Injects LoRA into ``model`` at the ``targets`` regex and creates the factors.

    Returns:
      ``(lora_model, params)``: ``lora_model.apply({"params": params}, ...)`` runs the adapted
      model; ``params`` are the given ones plus ``lora_a``/``lora_b`` (``lora_b = 0``).
    """
    lora_model = rplora_jax.inject_linen(model, targets, lora)
    variables = lora_model.init_from({"params": params}, as_key(rng), *example_inputs)
    return lora_model, variables["params"]


def fill_params(
    model: nn.Module,
    example_inputs: Sequence[jax.Array],
    pretrained: Mapping[tuple, Any],
    param_dtype: Any,
    *,
    fresh: Callable[[tuple], bool] = lambda path: False,
) -> Params:
    """The model's parameter tree filled with ``pretrained`` (flat ``{path tuple: array}``).

    Every parameter must have a pretrained tensor of its shape, except those ``fresh`` selects
    (left out, for the caller to initialise); every tensor must have a parameter.

    Raises:
      ValueError: naming the tensor or parameter that is missing, extra or of the wrong shape.
    """
    # Shapes only: the random initialisation would be overwritten anyway.
    shapes = jax.eval_shape(lambda k: model.init(k, *example_inputs), jax.random.key(0))
    flat_shapes = traverse_util.flatten_dict(shapes["params"])
    missing = [p for p in flat_shapes if not fresh(p) and p not in pretrained]
    if missing:
        raise ValueError(f"No pretrained value for parameters {['/'.join(p) for p in missing]}.")
    flat: dict[tuple, Any] = {}
    for path, value in pretrained.items():
        want = flat_shapes.get(path)
        if want is None:
            raise ValueError(f"Pretrained tensor for '{'/'.join(path)}' has no parameter.")
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"Pretrained tensor for '{'/'.join(path)}' has shape {value.shape}, the model "
                f"expects {want.shape}."
            )
        flat[path] = jnp.asarray(value, param_dtype)
    return traverse_util.unflatten_dict(flat)
