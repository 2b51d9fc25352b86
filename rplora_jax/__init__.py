"""rplora_jax: Riemannian-preconditioned LoRA for JAX, Optax and Flax."""

from rplora_jax import pairing
from rplora_jax.pairing import (
    DEFAULT_RULES,
    GEMMA,
    LORAX,
    NNX,
    PEFT,
    QWIX,
    LoRAPair,
    PairingRule,
    find_lora_pairs,
    names,
)
from rplora_jax.preconditioner import (
    DEFAULT_REG,
    riemannian_preconditioner,
    scaled_adamw,
    scaled_sgd,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REG",
    "DEFAULT_RULES",
    "GEMMA",
    "LORAX",
    "NNX",
    "PEFT",
    "QWIX",
    "LoRAPair",
    "PairingRule",
    "find_lora_pairs",
    "names",
    "pairing",
    "riemannian_preconditioner",
    "scaled_adamw",
    "scaled_sgd",
]
