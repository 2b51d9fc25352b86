"""Parallel Bible verses from installed SWORD modules (King James -> World English Bible).

The Debian packages ``sword-text-kjv`` (module ``engKJV2006eb``) and ``sword-text-web``
(``engWEB2015eb``) install public-domain translations under ``/usr/share/sword`` in SWORD's
compressed-text format (``zText``; ``zCom`` commentaries use the same files). This module reads
that format directly, with no SWORD library:

* ``<testament>.bzs``: block index, one ``(offset, compressed size, uncompressed size)`` record
  of three little-endian ``uint32`` per block of ``.bzz``;
* ``<testament>.bzv``: verse index, one ``(block, offset in the uncompressed block, length)``
  record (``uint32, uint32, uint16``) per key;
* ``<testament>.bzz``: the zlib-compressed blocks, concatenated.

Keys follow the module's versification (``Versification=`` in its ``mods.d/*.conf``): slot 0 is
the module heading, slot 1 the testament heading, then per book a book heading and per chapter a
chapter heading followed by its verses. The verse text is OSIS markup; :func:`clean_osis` drops
footnotes, cross-references and non-canonical headings and keeps the words.

Verses are aligned by reference (book, chapter, verse), so a KJV-versified and an
NRSVA-versified module pair up wherever the references agree (about 31,000 verses).

Example:
  >>> from experiments.data import bible
  >>> splits = bible.kjv_web_splits(seed=0)  # doctest: +SKIP
  >>> splits["train"][0].source, splits["train"][0].target  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from experiments.data.datasets import DatasetNotInstalledError

__all__ = [
    "SwordModule",
    "VersePair",
    "clean_osis",
    "find_module",
    "is_available",
    "kjv_web_splits",
    "parallel_verses",
    "split_pairs",
]

#: SWORD module names of the Debian packages, and the apt command that installs them.
KJV_MODULE = "engKJV2006eb"
WEB_MODULE = "engWEB2015eb"
APT_HINT = "apt-get install -y sword-text-kjv sword-text-web"

Ref = tuple[str, int, int]

#: Book order and verses per chapter of each versification:
#: ``{name: {"ot" | "nt": [(osis_id, book name, [verses of chapter 1, 2, ...]), ...]}}``, read from
#: ``versification.json`` next to this file (generated from SWORD's ``canon*.h`` headers).
VERSIFICATIONS: dict[str, dict[str, list[tuple[str, str, list[int]]]]] = {
    name: {testament: [tuple(book) for book in books] for testament, books in table.items()}
    for name, table in json.loads(
        (Path(__file__).with_name("versification.json")).read_text(encoding="utf-8")
    )["versifications"].items()
}

_BZV = np.dtype([("block", "<u4"), ("offset", "<u4"), ("length", "<u2")])


def _sword_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("SWORD_PATH", "").split(os.pathsep) if p]
    system = [Path.home() / ".sword", Path("/usr/share/sword"), Path("/usr/local/share/sword")]
    return [*roots, *system]


def _read_conf(path: Path) -> dict[str, str]:
    conf = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            conf.setdefault(key.strip(), value.strip())
    return conf


def find_module(name: str) -> tuple[Path, dict[str, str]]:
    """Locates an installed SWORD module by name: its data folder and its ``.conf`` entries.

    Looks in ``$SWORD_PATH`` (``os.pathsep``-separated), ``~/.sword`` and ``/usr/share/sword``.

    Raises:
      DatasetNotInstalledError: no ``mods.d`` conf names the module.
    """
    for root in _sword_roots():
        mods = root / "mods.d"
        if not mods.is_dir():
            continue
        for conf_path in sorted(mods.glob("*.conf")):
            text = conf_path.read_text(encoding="utf-8", errors="replace")
            if f"[{name}]".lower() not in text.lower():
                continue
            conf = _read_conf(conf_path)
            data = (root / conf.get("DataPath", "")).resolve()
            return data, conf
    raise DatasetNotInstalledError(
        f"SWORD module '{name}' was not found under {[str(r) for r in _sword_roots()]}. "
        f"Install the Debian packages with: {APT_HINT}"
    )


class SwordModule:
    """Reader of a SWORD ``zText``/``zCom`` module (zlib-compressed, verse-keyed).

    Args:
      path: the module's data folder (with ``ot.bzs`` ... ``nt.bzz``).
      versification: a key of the versification table (``"kjv"``, ``"kjva"``, ``"nrsv"``,
        ``"nrsva"``), case-insensitive.

    Raises:
      ValueError: unknown versification, a compression other than zlib, or index files that
        do not match the versification (named).

    Example:
      >>> m = SwordModule.installed("engKJV2006eb")  # doctest: +SKIP
      >>> m.raw(("Gen", 1, 1))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, versification: str = "kjv"):
        self.path = Path(path)
        key = versification.lower()
        if key not in VERSIFICATIONS:
            raise ValueError(
                f"Versification '{versification}' is not supported; "
                f"known: {sorted(VERSIFICATIONS)}."
            )
        self.versification = key
        self._slots: dict[str, dict[Ref, int]] = {}
        self._files: dict[str, tuple[np.ndarray, np.ndarray, bytes]] = {}
        for testament, books in VERSIFICATIONS[key].items():
            slots, slot = {}, 2  # 0: module heading, 1: testament heading
            for osis, _, counts in books:
                slot += 1  # book heading
                for chapter, n in enumerate(counts, start=1):
                    slot += 1  # chapter heading
                    for verse in range(1, n + 1):
                        slots[(osis, chapter, verse)] = slot
                        slot += 1
            self._slots[testament] = slots
            files = [self.path / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")]
            if not all(f.is_file() for f in files):
                continue  # a module may hold one testament only
            blocks = np.fromfile(files[0], dtype="<u4")
            if blocks.size % 3:
                raise ValueError(f"{files[0]}: size is not a whole number of 12-byte records.")
            raw = files[1].read_bytes()
            if len(raw) % _BZV.itemsize:
                raise ValueError(f"{files[1]}: size is not a whole number of 10-byte records.")
            index = np.frombuffer(raw, dtype=_BZV)
            if len(index) < slot:
                raise ValueError(
                    f"{files[1]} has {len(index)} keys but versification '{key}' needs {slot} "
                    f"for the {testament.upper()}: wrong versification?"
                )
            self._files[testament] = (blocks.reshape(-1, 3), index, files[2].read_bytes())
        if not self._files:
            raise ValueError(f"{self.path}: no ot.* or nt.* zText files found.")
        self._block_cache: dict[tuple[str, int], bytes] = {}

    @classmethod
    def installed(cls, name: str) -> SwordModule:
        """Opens an installed module by name, with the versification its conf declares.

        Raises:
          DatasetNotInstalledError: the module is not installed.
          ValueError: the module is not zlib-compressed ``zText``/``zCom``.
        """
        path, conf = find_module(name)
        driver = conf.get("ModDrv", "").lower()
        if driver not in ("ztext", "zcom", "ztext4", "zcom4"):
            raise ValueError(f"SWORD module '{name}' uses ModDrv={driver!r}; zText/zCom only.")
        if driver.endswith("4"):
            raise ValueError(f"SWORD module '{name}': 32-bit-length {driver} is not supported.")
        if conf.get("CompressType", "ZIP").upper() != "ZIP":
            raise ValueError(
                f"SWORD module '{name}' uses CompressType={conf['CompressType']}; only ZIP."
            )
        return cls(path, conf.get("Versification", "KJV"))

    def _block(self, testament: str, number: int) -> bytes:
        key = (testament, number)
        if key not in self._block_cache:
            blocks, _, data = self._files[testament]
            offset, size, usize = (int(x) for x in blocks[number])
            text = zlib.decompress(data[offset : offset + size])
            if len(text) != usize:
                raise ValueError(
                    f"{self.path}/{testament}.bzz block {number}: {len(text)} bytes after "
                    f"decompression, the index says {usize}."
                )
            self._block_cache[key] = text
        return self._block_cache[key]

    def raw(self, ref: Ref) -> str:
        """The OSIS markup of one verse (``""`` when the module leaves it empty).

        Raises:
          KeyError: the reference does not exist in this versification.
        """
        for testament, slots in self._slots.items():
            if ref in slots:
                if testament not in self._files:
                    return ""
                _, index, _ = self._files[testament]
                rec = index[slots[ref]]
                if rec["length"] == 0:
                    return ""
                block = self._block(testament, int(rec["block"]))
                start = int(rec["offset"])
                return block[start : start + int(rec["length"])].decode("utf-8", errors="replace")
        raise KeyError(f"{ref} is not a verse of versification '{self.versification}'.")

    def references(self) -> Iterator[Ref]:
        """All verse references of the versification, in canonical order."""
        for testament, slots in self._slots.items():
            if testament in self._files:
                yield from slots

    def verses(self) -> dict[Ref, str]:
        """``{reference: cleaned text}`` for every non-empty verse."""
        out = {}
        for ref in self.references():
            text = clean_osis(self.raw(ref))
            if text:
                out[ref] = text
        return out


_DROP = re.compile(
    r"<note\b[^>]*>.*?</note>"
    r"|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>"
    r"|<(chapter|div|milestone|lb|verse)\b[^>]*/?>",
    re.DOTALL,
)
# A book's closing marker; anything after it in a verse is back matter (WEB's glossary).
_BOOK_END = re.compile(r"<div\b[^>]*\beID=[^>]*\btype=\"book\"[^>]*/>")
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?\u2019\u201d)])")  # also right quotes


def is_available(*names: str) -> bool:
    """Whether the SWORD modules ``names`` (default: KJV and WEB) are installed."""
    try:
        for name in names or (KJV_MODULE, WEB_MODULE):
            find_module(name)
    except DatasetNotInstalledError:
        return False
    return True


def clean_osis(markup: str) -> str:
    """Plain text of an OSIS verse: footnotes, cross-references and editorial headings dropped.

    Text after a book's closing ``<div eID=... type="book"/>`` (back matter appended to the last
    verse) is dropped too.

    Example:
      >>> clean_osis('In the <w lemma="strong:H7225">beginning</w><note>fn</note> God.')
      'In the beginning God.'
    """
    end = _BOOK_END.search(markup)
    text = _DROP.sub(" ", markup[: end.start()] if end else markup)
    text = html.unescape(_TAG.sub("", text)).replace("¶", " ")
    text = _SPACE.sub(" ", text).strip()
    return _BEFORE_PUNCT.sub(r"\1", text)


@dataclasses.dataclass(frozen=True)
class VersePair:
    """One verse in two translations.

    Attributes:
      ref: ``(osis book, chapter, verse)``, e.g. ``("John", 3, 16)``.
      source: the source translation's text (KJV).
      target: the target translation's text (WEB).
    """

    ref: Ref
    source: str
    target: str

    @property
    def label(self) -> str:
        return f"{self.ref[0]} {self.ref[1]}:{self.ref[2]}"


def parallel_verses(source: str = KJV_MODULE, target: str = WEB_MODULE) -> list[VersePair]:
    """Verses present (non-empty) in both modules, matched by reference, in source order.

    Raises:
      DatasetNotInstalledError: a module is not installed.
    """
    src = SwordModule.installed(source).verses()
    tgt = SwordModule.installed(target).verses()
    return [VersePair(ref, text, tgt[ref]) for ref, text in src.items() if ref in tgt]


def split_pairs(
    pairs: list[VersePair],
    *,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    seed: int = 0,
) -> dict[str, list[VersePair]]:
    """A seeded random split into ``train``, ``valid`` and ``test`` (each in canonical order).

    Raises:
      ValueError: fractions outside ``[0, 1)`` or summing to 1 or more.
    """
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1) or (
        valid_fraction + test_fraction >= 1
    ):
        raise ValueError(
            f"valid_fraction {valid_fraction} and test_fraction {test_fraction} must be in "
            "[0, 1) and sum to less than 1."
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_valid = round(valid_fraction * len(pairs))
    n_test = round(test_fraction * len(pairs))
    parts = {
        "valid": order[:n_valid],
        "test": order[n_valid : n_valid + n_test],
        "train": order[n_valid + n_test :],
    }
    return {name: [pairs[i] for i in sorted(idx)] for name, idx in parts.items()}


def kjv_web_splits(
    *, valid_fraction: float = 0.02, test_fraction: float = 0.02, seed: int = 0
) -> dict[str, list[VersePair]]:
    """KJV -> WEB verse pairs from the Debian SWORD packages, split by :func:`split_pairs`.

    Raises:
      DatasetNotInstalledError: ``sword-text-kjv``/``sword-text-web`` missing
        (install with ``apt-get install -y sword-text-kjv sword-text-web``).
    """
    return split_pairs(
        parallel_verses(),
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
