"""The four optimizers the experiments compare, built so one compiled step serves every rate.

Shared by ``finetune_classification.py`` and ``generative_finetune.py`` (each script's folder is
on ``sys.path`` when it runs, so they import this as ``optimizers``).
"""

from __future__ import annotations

import optax

import rplora_jax

OPTIMIZERS = ("adamw", "scaled_adamw", "sgd", "scaled_sgd")


def _factory(name: str, momentum: float, weight_decay: float, reg: float):
    # Explicit one-argument signatures: inject_hyperparams reads the factory's signature.
    if name == "adamw":
        return lambda learning_rate: optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "scaled_adamw":
        return lambda learning_rate: rplora_jax.scaled_adamw(
            learning_rate, weight_decay=weight_decay, reg=reg
        )
    if name == "sgd":
        return lambda learning_rate: optax.sgd(learning_rate, momentum=momentum or None)
    if name == "scaled_sgd":
        return lambda learning_rate: rplora_jax.scaled_sgd(
            learning_rate, momentum=momentum or None, reg=reg
        )
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


def make_optimizer(
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    reg: float = rplora_jax.DEFAULT_REG,
) -> optax.GradientTransformation:
    """One of :data:`OPTIMIZERS` at constant learning rate ``lr``.

    The scaled variants are the plain ones with the Riemannian preconditioner in front; leaves
    that are not LoRA factors (a classification head) get the plain update in both. The rate is
    held in the optimizer state (``optax.inject_hyperparams``), so one compiled train step serves
    every rate of a sweep.

    Args:
      name: one of :data:`OPTIMIZERS`.
      lr: the learning rate.
      momentum: for ``sgd`` / ``scaled_sgd`` (0 for none).
      weight_decay: for ``adamw`` / ``scaled_adamw``.
      reg: the preconditioner's ``reg`` (scaled variants only).

    Returns:
      An ``optax.GradientTransformation`` whose state holds ``learning_rate``.

    Example:
      >>> tx = make_optimizer("scaled_adamw", 1e-3)
    """
    return optax.inject_hyperparams(_factory(name, momentum, weight_decay, reg))(learning_rate=lr)
