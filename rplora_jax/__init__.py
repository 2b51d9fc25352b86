"""rplora_jax: Riemannian-preconditioned LoRA (Zhang & Pilanci, ICML 2024) for JAX and Optax.

Architecture (file -> job):

* Core, needs only ``jax``, ``optax`` and ``numpy``:

  - ``preconditioner.py``: ``riemannian_preconditioner`` (the ``r x r`` solve, an optax
    transformation), ``scaled_sgd``, ``scaled_adamw``; private modules hold what it uses: the
    linear algebra (``_linalg.py``), the grouping of pairs and the choice of forms
    (``_grouping.py``), meshes (``_mesh.py``).
  - ``pairing.py``: finding the A/B pairs in any parameter tree by path (``find_lora_pairs``,
    ``PairingRule``, the rules for each layout); ``_trees.py``: paths and Flax containers.
  - ``partition.py``: training only the factors (``freeze_base``, ``lora_labels``,
    ``count_parameters``).
  - ``merge.py``: folding LoRA into the base weights and back (``merge``, ``unmerge``).
  - ``sharding.py``: ``PartitionSpec``\\ s for the factors from their kernels' (``lora_specs``).
  - ``adapters.py``: saving/loading only the factors (safetensors, the ``adapters`` extra).
  - ``loraplus.py``: ``loraplus_adamw``, the LoRA+ baseline (Hayou et al. 2024).
  - ``lora_rite.py``: ``scale_by_lora_rite``, ``lora_rite`` (LoRA-RITE, Yen et al. 2025);
    ``reflora.py``: ``reflora_preconditioner``, ``reflora_adamw`` (RefLoRA, Zhang et al.
    2025): the paper's successors.
  - ``peft_format.py``: adapters in HuggingFace PEFT's format (``PeftModel.from_pretrained``
    loads them) and PEFT adapters loaded into this library's parameters (file I/O needs the
    ``adapters`` extra).

* ``layers/``: ``LoRAConfig`` (``layers/config.py``, no Flax needed), and, needing ``flax`` (the
  ``flax`` extra), the linen and NNX LoRA layers and ``inject_linen`` / ``inject_nnx`` to add
  LoRA to an existing model. These names load on first use, so ``import rplora_jax`` does not
  import Flax.

The public API is ``__all__`` plus the module-level names documented in the API reference
(``docs/api.md``); anything else may change between versions.
"""

import importlib
from typing import Any

from rplora_jax.adapters import load_adapter, save_adapter
from rplora_jax.lora_rite import lora_rite, scale_by_lora_rite
from rplora_jax.loraplus import loraplus_adamw
from rplora_jax.merge import merge, unmerge
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
)
from rplora_jax.partition import count_parameters, freeze_base, lora_labels
from rplora_jax.peft_format import load_peft_adapter, peft_config, save_peft_adapter
from rplora_jax.preconditioner import (
    DEFAULT_REG,
    riemannian_preconditioner,
    scaled_adamw,
    scaled_sgd,
)
from rplora_jax.reflora import reflora_adamw, reflora_preconditioner
from rplora_jax.sharding import lora_specs

__version__ = "0.2.0"

# Public names whose modules need Flax: imported on first access (PEP 562).
_LAZY = {
    "LoRAConfig": "rplora_jax.layers.config",
    "inject_linen": "rplora_jax.layers.inject",
    "inject_nnx": "rplora_jax.layers.inject",
    "LinenLoRA": "rplora_jax.layers.inject",
    "layers": "rplora_jax.layers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "layers" else getattr(module, name)
    raise AttributeError(f"module 'rplora_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "LoRAPair",
    "PairingRule",
    "count_parameters",
    "find_lora_pairs",
    "freeze_base",
    "inject_linen",
    "inject_nnx",
    "load_adapter",
    "load_peft_adapter",
    "lora_labels",
    "lora_rite",
    "lora_specs",
    "loraplus_adamw",
    "merge",
    "peft_config",
    "reflora_adamw",
    "reflora_preconditioner",
    "riemannian_preconditioner",
    "save_adapter",
    "save_peft_adapter",
    "scale_by_lora_rite",
    "scaled_adamw",
    "scaled_sgd",
    "unmerge",
]
