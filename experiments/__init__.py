"""Experiments and benchmarks' support code: datasets, pretrained model ports and the scripts.

Not part of the installed ``rplora_jax`` package. Run the scripts from the repository root as
modules, e.g. ``python -m experiments.finetune_classification --help``.
"""
