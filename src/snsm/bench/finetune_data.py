"""Data of the fine-tuning benchmark (``python -m snsm.bench --task finetune``): the held-out works.

The embedded corpus (:mod:`snsm.bench.corpus`) is split by source: every document of the
held-out source (``milton``, :data:`HELD_OUT_SOURCE`) is kept away from the base model's
pretraining (its tokenizer and its train and validation streams), and the two fine-tuning tasks
are built from those documents only:

* **domain adaptation** (``lm``): language modelling on the held-out works; every held-out
  document's first ``1 - VAL_FRACTION`` of tokens goes to the fine-tuning train stream, its last
  ``VAL_FRACTION`` to validation (every work is in both, and no token is in both);
* **classification** (``cls``): which work a passage of ``seq_len`` tokens comes from. The works
  (:func:`work_of`: Paradise Lost's ten books are one work, Paradise Regained's four another, the
  other documents one each) are the classes; the same head/tail split of every document gives
  each class a train region and a validation region. Training passages start at random offsets
  in a class' train region (classes drawn uniformly: balanced), seeded by ``(seed, step)``;
  validation passages are the same number of non-overlapping windows per class, evenly spread
  over its validation region.

Only the standard library, numpy and torch are used; the tokenizer is passed in.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import torch

from . import BenchError

log = logging.getLogger(__name__)

HELD_OUT_SOURCE = "milton"
VAL_FRACTION = 0.15  # of every held-out document's tokens: its tail (32 validation passages of 128 in every class)


def work_of(title: str) -> str:
    """The work a held-out document belongs to: its title up to the first comma or parenthesis
    (``"Paradise Lost, Book IV"`` -> ``"Paradise Lost"``, ``"Comus (ed. ...)"`` -> ``"Comus"``)."""
    return re.split(r",| \(", title)[0].strip()


def split_corpus(docs: Sequence[dict], held_out: str = HELD_OUT_SOURCE) -> tuple[list[dict], list[dict]]:
    """``(pretraining documents, held-out documents)``: the held-out source's documents apart."""
    pre = [d for d in docs if d["source"] != held_out]
    out = [d for d in docs if d["source"] == held_out]
    if not out:
        raise BenchError(f"the corpus has no documents of the held-out source {held_out!r}")
    return pre, out


def pretraining_documents(held_out: str = HELD_OUT_SOURCE) -> tuple[list[dict], list[dict], list[dict]]:
    """The embedded corpus without the held-out source, split into train and validation by the
    corpus' own rule, and the held-out documents: ``(train, val, held_out_docs)``."""
    from . import corpus
    pre, out = split_corpus(corpus.load_documents(), held_out)
    train, val = corpus.split_documents(pre)
    return train, val, out


def encode_documents(tok, docs: Sequence[dict], eos: int) -> list[np.ndarray]:
    """Token ids of every document followed by ``eos`` (int32)."""
    return [np.asarray(e.ids + [eos], dtype=np.int32) for e in tok.encode_batch([d["text"] for d in docs])]


def head_tail(ids: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """A document's tokens split into its head (train) and its tail (validation)."""
    cut = len(ids) - max(1, int(round(val_fraction * len(ids))))
    return ids[:cut], ids[cut:]


def lm_streams(encoded: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token streams of the domain-adaptation task (heads, tails)."""
    heads, tails = zip(*(head_tail(ids) for ids in encoded))
    return np.concatenate(heads), np.concatenate(tails)


def class_regions(docs: Sequence[dict], encoded: Sequence[np.ndarray]) -> tuple[list[str], list[np.ndarray],
                                                                                    list[np.ndarray]]:
    """``(works, train regions, validation regions)`` of the classification task: per work (in
    order of first appearance), the concatenated heads and tails of its documents."""
    works: list[str] = []
    train: dict[str, list[np.ndarray]] = {}
    val: dict[str, list[np.ndarray]] = {}
    for d, ids in zip(docs, encoded):
        w = work_of(d["title"])
        if w not in train:
            works.append(w)
            train[w], val[w] = [], []
        h, t = head_tail(ids)
        train[w].append(h)
        val[w].append(t)
    return works, [np.concatenate(train[w]) for w in works], [np.concatenate(val[w]) for w in works]


class Passages:
    """Classification batches: ``batch(step)`` -> ``(x, y)``, ``x`` (batch, seq_len) token ids and
    ``y`` (batch,) the work each passage comes from; a pure function of ``(seed, step)``."""

    def __init__(self, regions: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int):
        for c, r in enumerate(regions):
            if len(r) < seq_len:
                raise BenchError(f"class {c} has {len(r)} training tokens, fewer than one passage of {seq_len}")
        self.regions, self.seq_len, self.batch_size, self.seed = list(regions), seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 7, step])
        ys = rng.integers(0, len(self.regions), self.batch_size)
        rows = []
        for y in ys:
            r = self.regions[y]
            start = int(rng.integers(0, len(r) - self.seq_len + 1))
            rows.append(np.asarray(r[start:start + self.seq_len], dtype=np.int64))
        return torch.from_numpy(np.stack(rows)), torch.from_numpy(ys.astype(np.int64))


def val_passages(regions: Sequence[np.ndarray], seq_len: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classification validation set: the same number of passages from every class (at most
    ``per_class``, fewer if a class' validation region is short), non-overlapping, evenly spread."""
    k = min(per_class, *(len(r) // seq_len for r in regions))
    if k < 1:
        raise BenchError(f"a class' validation text is shorter than one passage of {seq_len} tokens")
    xs, ys = [], []
    for c, r in enumerate(regions):
        n = len(r) // seq_len
        for b in np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)):
            xs.append(np.asarray(r[b * seq_len:(b + 1) * seq_len], dtype=np.int64))
            ys.append(c)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


__all__ = ["HELD_OUT_SOURCE", "VAL_FRACTION", "work_of", "split_corpus", "pretraining_documents",
           "encode_documents", "head_tail", "lm_streams", "class_regions", "Passages", "val_passages"]
