"""Pretrained models with LoRA, for experiments that run offline."""

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
    "load_pretrained",
    "mean_pool",
    "merge_params",
    "minilm_dir",
    "split_trainable",
]
