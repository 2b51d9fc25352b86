"""rplora_jax: Riemannian-preconditioned LoRA for JAX, Optax and Flax."""

import importlib
from typing import Any

from rplora_jax import adapters, inject, linen, nnx, pairing, sharding
from rplora_jax._common import lora_scaling
from rplora_jax.adapters import (
    apply_adapter,
    count_parameters,
    extract_adapter,
    freeze_base,
    load_adapter,
    lora_labels,
    merge,
    print_trainable_parameters,
    read_adapter_metadata,
    save_adapter,
    trainable_mask,
    unmerge,
)
from rplora_jax.inject import LinenLoRA, inject_linen, inject_nnx
from rplora_jax.linen import LoRAConfig, LoRADense, LoRADenseGeneral, LoRAEinsum
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
from rplora_jax.sharding import lora_factor_specs, lora_specs, named_shardings

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # orbax-checkpoint takes seconds to import: load it only for users who checkpoint.
    if name == "checkpoint":
        return importlib.import_module("rplora_jax.checkpoint")
    if name == "TrainCheckpointer":
        return importlib.import_module("rplora_jax.checkpoint").TrainCheckpointer
    raise AttributeError(f"module 'rplora_jax' has no attribute {name!r}")


__all__ = [
    "DEFAULT_REG",
    "DEFAULT_RULES",
    "GEMMA",
    "LORAX",
    "NNX",
    "PEFT",
    "QWIX",
    "LinenLoRA",
    "LoRAConfig",
    "LoRADense",
    "LoRADenseGeneral",
    "LoRAEinsum",
    "LoRAPair",
    "PairingRule",
    "TrainCheckpointer",
    "adapters",
    "apply_adapter",
    "checkpoint",
    "count_parameters",
    "extract_adapter",
    "find_lora_pairs",
    "freeze_base",
    "inject",
    "inject_linen",
    "inject_nnx",
    "linen",
    "load_adapter",
    "lora_factor_specs",
    "lora_labels",
    "lora_scaling",
    "lora_specs",
    "merge",
    "named_shardings",
    "names",
    "nnx",
    "pairing",
    "print_trainable_parameters",
    "read_adapter_metadata",
    "riemannian_preconditioner",
    "save_adapter",
    "scaled_adamw",
    "scaled_sgd",
    "sharding",
    "trainable_mask",
    "unmerge",
]
