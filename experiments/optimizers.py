"""The optimizers the experiments compare, built so one compiled step serves every rate.

:data:`OPTIMIZERS` are the four of the paper (the default sweeps); :data:`BASELINES` adds LoRA+
(:func:`rplora_jax.loraplus.loraplus_adamw`) and the paper's successors LoRA-RITE
(:func:`rplora_jax.lora_rite`) and RefLoRA (:func:`rplora_jax.reflora_adamw`), which the scripts
accept by name.

Shared by :mod:`experiments.finetune_classification` and :mod:`experiments.generative_finetune`.
Each is wrapped in :func:`rplora_jax.freeze_base`, so the train steps differentiate and update
the *whole* parameter tree and only the LoRA factors (and ``also_train`` leaves, a
classification head) change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import optax

import rplora_jax
from rplora_jax.loraplus import loraplus_adamw

OPTIMIZERS = ("adamw", "scaled_adamw", "sgd", "scaled_sgd")
BASELINES = ("loraplus_adamw", "lora_rite", "reflora_adamw")
ALL_OPTIMIZERS = OPTIMIZERS + BASELINES


def _factory(name: str, momentum: float, weight_decay: float, reg: float, lr_ratio: float):
    # Explicit one-argument signatures: inject_hyperparams reads the factory's signature.
    if name == "adamw":
        return lambda learning_rate: optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "scaled_adamw":
        return lambda learning_rate: rplora_jax.scaled_adamw(
            learning_rate, weight_decay=weight_decay, reg=reg
        )
    if name == "loraplus_adamw":
        return lambda learning_rate: loraplus_adamw(
            learning_rate, lr_ratio=lr_ratio, weight_decay=weight_decay
        )
    if name == "reflora_adamw":
        return lambda learning_rate: rplora_jax.reflora_adamw(
            learning_rate, weight_decay=weight_decay
        )
    if name == "lora_rite":
        # LoRA-RITE has a rule for LoRA factors only: other trained leaves (a new head) get
        # AdamW at the same rate.
        return lambda learning_rate: optax.partition(
            {
                "lora": rplora_jax.lora_rite(learning_rate, weight_decay=weight_decay),
                "frozen": optax.adamw(learning_rate, weight_decay=weight_decay),
            },
            rplora_jax.lora_labels,
        )
    if name == "sgd":
        return lambda learning_rate: optax.sgd(learning_rate, momentum=momentum or None)
    if name == "scaled_sgd":
        return lambda learning_rate: rplora_jax.scaled_sgd(
            learning_rate, momentum=momentum or None, reg=reg
        )
    raise ValueError(f"Unknown optimizer {name!r}; choose from {ALL_OPTIMIZERS}.")


def make_optimizer(
    name: str,
    lr: float,
    *,
    also_train: str | Sequence[str] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    reg: float = rplora_jax.DEFAULT_REG,
    lr_ratio: float = 16.0,
) -> optax.GradientTransformation:
    """One of :data:`ALL_OPTIMIZERS` at constant learning rate ``lr``, for LoRA factors only.

    The scaled variants are the plain ones with the Riemannian preconditioner in front; leaves
    that are not LoRA factors but are trained (``also_train``, e.g. a classification head) get
    the plain update in both. Every other leaf is frozen by :func:`rplora_jax.freeze_base`:
    zero update and no optimizer state. The rate is held in the optimizer state
    (``optax.inject_hyperparams``), so one compiled train step serves every rate of a sweep.

    Args:
      name: one of :data:`ALL_OPTIMIZERS`.
      lr: the learning rate.
      also_train: regex(es) on ``/``-joined parameter paths of non-LoRA leaves to train.
      momentum: for ``sgd`` / ``scaled_sgd`` (0 for none).
      weight_decay: for ``adamw`` / ``scaled_adamw`` / ``loraplus_adamw`` / ``lora_rite`` /
        ``reflora_adamw``.
      reg: the preconditioner's ``reg`` (scaled variants only).
      lr_ratio: ``loraplus_adamw``'s ratio of the ``b`` factors' rate to ``lr``; its ``a``
        factors and ``also_train`` leaves step with ``lr``.

    Returns:
      An ``optax.GradientTransformation`` whose state holds ``learning_rate``
      (``state.hyperparams["learning_rate"]``).

    Example:
      >>> tx = make_optimizer("scaled_adamw", 1e-3, also_train=r"classifier/.*")
    """
    factory = _factory(name, momentum, weight_decay, reg, lr_ratio)
    also = tuple(also_train) if isinstance(also_train, (list, tuple)) else also_train

    def frozen(learning_rate):
        return rplora_jax.freeze_base(factory(learning_rate), also_train=also)

    return optax.inject_hyperparams(frozen)(learning_rate=lr)


def make_train_step(loss: Callable, tx: optax.GradientTransformation, *, has_aux: bool = False):
    """Jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``, donating both.

    Gradients are taken w.r.t. all parameters; ``tx`` (wrapped in
    :func:`rplora_jax.freeze_base`) leaves the frozen ones unchanged, and under ``jax.jit`` their
    unused gradients are dead code.

    Args:
      loss: ``loss(params, batch)``, a scalar, or ``(scalar, aux)`` with ``has_aux``.
      tx: the optimizer.
      has_aux: ``loss`` also returns auxiliary data (dropped by the step).
    """

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss, has_aux=has_aux)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value[0] if has_aux else value

    return step
