"""Pretrained models with LoRA, for experiments that run offline.

BERT's names are re-exported here; the Llama decoder is the submodule ``llama`` (its
``LoRAConfig`` and ``split_trainable`` differ from BERT's).
"""

from rplora_jax.models import llama
from rplora_jax.models.bert import (
    LORA_TARGETS,
    BertClassifier,
    BertConfig,
    BertEncoder,
    BertTokenizer,
    LoRAConfig,
    load_pretrained,
    mean_pool,
    merge_params,
    minilm_dir,
    split_trainable,
)

__all__ = [
    "LORA_TARGETS",
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "BertTokenizer",
    "LoRAConfig",
    "llama",
    "load_pretrained",
    "mean_pool",
    "merge_params",
    "minilm_dir",
    "split_trainable",
]
