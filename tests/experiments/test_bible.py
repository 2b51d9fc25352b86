"""The SWORD zText reader on the real Debian modules, and the KJV -> WEB verse alignment."""

import zlib

import numpy as np
import pytest

from experiments.data import bible
from experiments.data import datasets as data

_skip = pytest.mark.skipif(
    not bible.is_available(), reason=f"needs the SWORD Bibles: {bible.APT_HINT}"
)


def needs_modules(test):
    return pytest.mark.data(_skip(test))


@pytest.fixture(scope="module")
def pairs():
    return bible.parallel_verses()


def test_clean_osis_drops_notes_headings_and_back_matter():
    markup = (
        '<title type="section">Editorial heading</title>'
        '<w lemma="strong:H7225">In</w> the beginning<note placement="foot">a note</note> , '
        '<transChange type="added">is</transChange> &amp; <title canonical="true">Kept</title>'
        ' “said” . <chapter eID="Rev.22"/><div eID="g1" osisID="Rev" type="book"/> Glossary'
    )
    assert bible.clean_osis(markup) == "In the beginning, is & Kept “said”."


def test_synthetic_ztext_module_round_trips(tmp_path, monkeypatch):
    # Two testaments' worth of index in the real on-disk layout, with a one-book "canon".
    texts = {4: b"first <w>verse</w>", 5: b"second verse", 7: b"third"}
    block1 = b"".join(texts.values())
    comp = zlib.compress(block1)
    rows, offset = [], 0
    for slot in range(8):
        body = texts.get(slot, b"")
        rows.append((1 if body else 0, offset if body else 0, len(body)))
        offset += len(body)
    head = zlib.compress(b"")
    (tmp_path / "nt.bzz").write_bytes(head + comp)
    np.array([[0, len(head), 0], [len(head), len(comp), len(block1)]], "<u4").tofile(
        tmp_path / "nt.bzs"
    )
    bzv = np.array(rows, dtype=np.dtype([("b", "<u4"), ("o", "<u4"), ("n", "<u2")]))
    (tmp_path / "nt.bzv").write_bytes(bzv.tobytes())
    # Slots: 0 module, 1 testament, 2 book, 3 chapter 1, 4-5 its verses, 6 chapter 2, 7 verse.
    monkeypatch.setattr(bible, "VERSIFICATIONS", {"tiny": {"nt": [("Jude", "Jude", [2, 1])]}})
    module = bible.SwordModule(tmp_path, "tiny")
    assert module.verses() == {
        ("Jude", 1, 1): "first verse",
        ("Jude", 1, 2): "second verse",
        ("Jude", 2, 1): "third",
    }
    with pytest.raises(KeyError, match="not a verse"):
        module.raw(("Jude", 3, 1))


def test_versification_tables_load_from_json():
    kjv = bible.VERSIFICATIONS["kjv"]
    assert sorted(bible.VERSIFICATIONS) == ["kjv", "kjva", "nrsv", "nrsva"]
    assert [len(kjv["ot"]), len(kjv["nt"])] == [39, 27]
    assert kjv["ot"][0][:2] == ("Gen", "Genesis") and kjv["nt"][-1][0] == "Rev"
    assert sum(sum(book[2]) for t in ("ot", "nt") for book in kjv[t]) == 31_102
    ps = dict((b[0], b[2]) for b in kjv["ot"])["Ps"]
    assert len(ps) == 150 and ps[118] == 176  # Psalm 119


def test_bad_module_files_raise(tmp_path):
    with pytest.raises(ValueError, match="Versification 'nope' is not supported"):
        bible.SwordModule(tmp_path, "nope")
    with pytest.raises(ValueError, match=r"no ot\.\* or nt\.\* zText files"):
        bible.SwordModule(tmp_path, "kjv")
    for ext in ("bzs", "bzz"):
        (tmp_path / f"nt.{ext}").write_bytes(b"")
    (tmp_path / "nt.bzv").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"nt\.bzv has 10 keys but versification 'kjv' needs"):
        bible.SwordModule(tmp_path, "kjv")
    with pytest.raises(data.DatasetNotInstalledError, match="apt-get install"):
        bible.find_module("noSuchModule123")


@needs_modules
def test_installed_modules_read_known_verses():
    kjv = bible.SwordModule.installed(bible.KJV_MODULE)
    web = bible.SwordModule.installed(bible.WEB_MODULE)
    assert (kjv.versification, web.versification) == ("kjv", "nrsva")
    assert bible.clean_osis(kjv.raw(("Gen", 1, 1))) == (
        "In the beginning God created the heaven and the earth."
    )
    assert bible.clean_osis(web.raw(("Gen", 1, 1))) == (
        "In the beginning, God created the heavens and the earth."
    )
    john = bible.clean_osis(kjv.raw(("John", 3, 16)))
    assert john.startswith("For God so loved the world") and john.endswith("everlasting life.")
    # Last verse of each testament: the whole index lines up with the versification.
    assert bible.clean_osis(kjv.raw(("Mal", 4, 6))).endswith("smite the earth with a curse.")
    assert bible.clean_osis(web.raw(("Rev", 22, 21))) == (
        "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )


@needs_modules
def test_alignment_and_split(pairs):
    assert 30_500 < len(pairs) < 31_103  # KJV has 31,102 verses
    by_ref = {p.ref: p for p in pairs}
    assert (
        by_ref[("Ps", 23, 1)].target
        == "A Psalm by David. Yahweh is my shepherd; I shall lack nothing."
    )
    assert all(p.source and p.target and "<" not in p.source + p.target for p in pairs)
    lengths = np.array([len(p.target) / len(p.source) for p in pairs])
    assert lengths.max() < 6.0  # no back matter glued to a verse
    splits = bible.split_pairs(pairs, valid_fraction=0.02, test_fraction=0.02, seed=0)
    assert [len(splits[k]) for k in ("valid", "test")] == [round(0.02 * len(pairs))] * 2
    refs = [set(p.ref for p in splits[k]) for k in ("train", "valid", "test")]
    assert sum(map(len, refs)) == len(pairs) and not (refs[0] & refs[1] or refs[1] & refs[2])
    again = bible.split_pairs(pairs, seed=0)
    assert [p.ref for p in again["test"]] == [p.ref for p in splits["test"]]
    other = bible.split_pairs(pairs, seed=1)
    assert [p.ref for p in other["test"]] != [p.ref for p in splits["test"]]
    with pytest.raises(ValueError, match="sum to less than 1"):
        bible.split_pairs(pairs, valid_fraction=0.6, test_fraction=0.5)
