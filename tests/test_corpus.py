"""The embedded corpus: offline loading, the document split, and text hygiene."""
from __future__ import annotations

import json
import lzma
import random
import re
import socket
import unicodedata

import pytest

from snsm.bench import corpus

SOURCES = {"austen", "bible", "shakespeare", "milton", "fortunes"}


@pytest.fixture(scope="module")
def docs(monkeypatch_module):
    # Offline: any attempt to open a network connection fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("the corpus loader must not use the network")

    monkeypatch_module.setattr(socket, "create_connection", no_network)
    monkeypatch_module.setattr(socket.socket, "connect", no_network)
    return corpus.load_documents()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_embedded_file_ships_with_package():
    path = corpus.default_path()
    assert path.is_file()
    assert path.name == "corpus.jsonl.xz"
    assert 2e6 < path.stat().st_size < 6.5e6  # commit-friendly
    assert (path.parent / "NOTICE").is_file()


def test_load_offline_and_schema(docs):
    assert 600 <= len(docs) <= 900
    for d in docs:
        assert set(d) == {"source", "title", "text"}
        assert all(isinstance(v, str) and v for v in d.values())
    assert {d["source"] for d in docs} == SOURCES == set(corpus.SOURCES)
    # (source, title) identifies a document
    assert len({(d["source"], d["title"]) for d in docs}) == len(docs)


def test_load_returns_fresh_dicts(docs):
    again = corpus.load_documents()
    assert again == docs
    again[0]["text"] = "changed"
    assert corpus.load_documents()[0]["text"] == docs[0]["text"]


def test_load_other_path(tmp_path):
    rows = [{"source": "x", "title": f"t{i}", "text": f"text {i}"} for i in range(3)]
    path = tmp_path / "small.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert corpus.load_documents(path) == rows
    with pytest.raises(FileNotFoundError):
        corpus.load_documents(tmp_path / "missing.jsonl.xz")


def test_sizes_per_source(docs):
    stats = corpus.corpus_stats(docs)
    assert list(stats) == list(corpus.SOURCES)
    mb = {s: v["bytes"] / 1e6 for s, v in stats.items()}
    expected = {"austen": (3.5, 4.5), "bible": (4.3, 5.5), "shakespeare": (4.5, 5.5),
                "milton": (1.0, 1.6), "fortunes": (2.0, 2.8)}
    for source, (lo, hi) in expected.items():
        assert lo < mb[source] < hi, (source, mb[source])
    assert 16.0 < sum(mb.values()) < 19.5
    assert stats["austen"]["documents"] == 269  # 50+61+48+55+31+24 chapters
    assert stats["bible"]["documents"] >= 80
    assert sum(v["documents"] for v in stats.values()) == len(docs)


def test_split_deterministic_disjoint_and_covering(docs):
    train, val = corpus.split_documents(docs)
    train2, val2 = corpus.split_documents(list(docs))
    assert train == train2 and val == val2
    key = lambda d: (d["source"], d["title"])  # noqa: E731
    tk, vk = {key(d) for d in train}, {key(d) for d in val}
    assert not tk & vk
    assert len(tk) + len(vk) == len(docs)
    assert {d["source"] for d in val} == SOURCES
    assert {d["source"] for d in train} == SOURCES
    assert 0.03 * len(docs) < len(val) < 0.08 * len(docs)
    # independent of the input order
    shuffled = list(docs)
    random.Random(1).shuffle(shuffled)
    assert {key(d) for d in corpus.split_documents(shuffled)[1]} == vk
    # the seed changes the split, the fraction its size
    assert {key(d) for d in corpus.split_documents(docs, seed=1)[1]} != vk
    assert len(corpus.split_documents(docs, val_fraction=0.2)[1]) > 3 * len(val)
    assert corpus.split_documents(docs, val_fraction=0.0) == (list(docs), [])
    with pytest.raises(ValueError):
        corpus.split_documents(docs, val_fraction=1.0)


def test_split_is_stable_across_releases(docs):
    # Pin the validation set: a change here silently changes every benchmark number.
    _, val = corpus.split_documents(docs)
    titles = {(d["source"], d["title"]) for d in val}
    assert ("bible", "John") in titles
    assert ("shakespeare", "Pericles") in titles
    assert ("milton", "Paradise Regained, The First Book") in titles
    assert len(val) == 35


def test_text_is_clean(docs):
    for d in docs:
        text, where = d["text"], (d["source"], d["title"])
        assert "\r" not in text, where
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u0080-\u009f\ufeff]", text), where
        assert "\n\n\n" not in text, where
        assert text == text.strip(), where
        assert not re.search(r"[ \t]\n|\n[ \t]", text), where
        assert unicodedata.is_normalized("NFC", text), where
        if d["source"] != "fortunes":  # a few fortunes mention Project Gutenberg
            assert "gutenberg" not in text.lower(), where
        assert "*** START OF" not in text and "*** END OF" not in text, where
        assert not re.search(r"Ã.|Â[\u0080-\u00bf£]|â\u0080", text), where  # mojibake


def test_bible_has_no_markup(docs):
    bible = [d for d in docs if d["source"] == "bible"]
    for d in bible:
        assert "<" not in d["text"] and ">" not in d["text"], d["title"]
        assert not re.search(r"&(amp|lt|gt|quot|apos|#\d+);", d["text"]), d["title"]
        assert "strong:" not in d["text"], d["title"]
    titles = {d["title"] for d in bible}
    assert {"Genesis", "Psalms", "Matthew", "Revelation", "Tobit"} <= titles
    genesis = next(d["text"] for d in bible if d["title"] == "Genesis")
    assert "In the beginning, God created the heavens and the earth." in genesis


def test_austen_chapters(docs):
    austen = [d for d in docs if d["source"] == "austen"]
    first = next(d for d in austen if d["title"] == "Pride and Prejudice, Chapter 1")
    assert first["text"].startswith("It is a truth universally acknowledged")
    for d in austen:
        assert not re.match(r"\s*CHAPTER\b", d["text"]), d["title"]
        # prose is unwrapped: no single line breaks inside paragraphs
        assert "\n" not in d["text"].replace("\n\n", ""), d["title"]


def test_fortunes_grouped(docs):
    fortunes = [d for d in docs if d["source"] == "fortunes"]
    assert all(not re.search(r"(?m)^%$", d["text"]) for d in fortunes)
    assert sum(d["text"].count("\n\n") + 1 for d in fortunes) > 10_000
    assert all(not d["title"].startswith(("ascii-art", "translate-me")) for d in fortunes)
