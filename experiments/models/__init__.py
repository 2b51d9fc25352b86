"""Pretrained models ported to plain Flax layers, adapted with :func:`rplora_jax.inject_linen`.

:mod:`experiments.models.bert` (all-MiniLM-L6-v2) and :mod:`experiments.models.llama`
(SmolLM2-135M-Instruct).
"""
