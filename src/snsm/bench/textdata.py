"""Documents, the train/validation split, token streams and batches.

Sources:
* default: the embedded English corpus (``snsm.bench.corpus``), split by
  document with the corpus' own deterministic rule; fully offline;
* ``--dataset NAME`` (``[NAME:CONFIG]``): a Hugging Face dataset through
  ``datasets`` in streaming mode (train from its ``train`` split, validation
  from ``validation`` when present, else a hash split of the streamed train
  documents); only as much text as the token budget needs is read;
* ``--data-files PATH...``: local ``.txt`` (documents are blank-line separated
  blocks), ``.jsonl``/``.json`` (one object per line, field ``text``) and
  ``.parquet`` (column ``text``) files, hash-split by document.

Documents are tokenized, joined with the end-of-text token and cached as
``uint16``/``int32`` ``.npy`` arrays. :class:`Batches` cuts the train stream
into non-overlapping ``seq_len + 1`` blocks and visits them in a seeded random
order, epoch after epoch: the batch at a step is a pure function of
``(seed, step)``, so resuming needs only the step, every optimizer sees the
same tokens, and a rank/world-size split for data parallelism is a slice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import BenchError
from .fileio import writing

log = logging.getLogger(__name__)

VAL_FRACTION = 0.02
CHARS_PER_TOKEN = 4  # rough, to bound how much of a streamed dataset is read


def _hash_split(docs: Sequence[str], val_fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        (val if zlib.crc32(d.encode("utf-8", "replace")) % 10_000 < val_fraction * 10_000 else train).append(d)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val


def corpus_documents() -> tuple[list[str], list[str], str]:
    """Train and validation texts of the embedded corpus, and a description."""
    try:
        from . import corpus
    except ImportError as e:  # pragma: no cover - the corpus ships with the package
        raise BenchError(f"the embedded corpus is not available ({e}); use --data-files or --dataset") from None
    docs = corpus.load_documents()
    train, val = corpus.split_documents(docs)
    return [d["text"] for d in train], [d["text"] for d in val], "embedded corpus"


def _read_text_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in blocks if b]


def _read_jsonl(path: Path) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise BenchError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BenchError(f"{path}:{i}: expected an object with a string field 'text'")
            out.append(obj["text"])
    return out


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchError("reading .parquet needs pyarrow (installed with the [bench] extra's datasets)") from None
    table = pq.read_table(path, columns=["text"])
    return [t for t in table.column("text").to_pylist() if t]


def file_documents(paths: Sequence[str]) -> tuple[list[str], list[str], str]:
    """Train and validation texts from local files (see the module docstring for formats)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise BenchError(f"data path not found: {p}")
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    docs: list[str] = []
    for f in files:
        suffix = "".join(f.suffixes[-1:]).lower()
        if suffix in (".jsonl", ".json"):
            docs.extend(_read_jsonl(f))
        elif suffix == ".parquet":
            docs.extend(_read_parquet(f))
        elif suffix in (".txt", ".md", ".text", ""):
            docs.extend(_read_text_file(f))
        else:
            raise BenchError(f"unsupported data file type {suffix!r}: {f} (use .txt, .jsonl or .parquet)")
    if not docs:
        raise BenchError(f"no text found in {', '.join(paths)}")
    train, val = _hash_split(docs)
    if not val:
        raise BenchError("need at least two documents to split off a validation set")
    return train, val, f"{len(files)} local file(s)"


class StreamedDataset:
    """A Hugging Face dataset read in streaming mode, ``NAME`` or ``NAME:CONFIG``.

    Train text comes from the ``train`` split (minus the hash-selected validation documents
    when the dataset has no ``validation`` split), validation text from ``validation``.
    Nothing is held in memory beyond the tokenizer's training sample and one batch of
    documents: :func:`cached_encode` writes the token stream to disk as it goes.
    """

    def __init__(self, spec: str, config: str | None = None):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise BenchError("--dataset needs the 'datasets' package (pip install 'snsm[bench]')") from None
        name, _, cfg = spec.partition(":")
        self.name, self.config = name, cfg or config
        self.description = f"dataset {name}" + (f" ({self.config})" if self.config else "")
        self.key = f"{self.name}|{self.config}"
        self._has_val = None

    def _rows(self, split: str) -> Iterable[str]:
        import datasets
        try:
            ds = datasets.load_dataset(self.name, self.config, split=split, streaming=True)
            for row in ds:
                t = row.get("text")
                if t:
                    yield t
        except BenchError:
            raise
        except Exception as e:  # network, unknown name, missing split, ...: one line for the user
            msg = str(e).splitlines()[0] if str(e) else ""
            raise BenchError(f"could not read {self.description}, split {split!r}: {type(e).__name__}: {msg}") from None

    def has_validation(self) -> bool:
        if self._has_val is None:
            try:
                next(iter(self._rows("validation")))
                self._has_val = True
            except (BenchError, StopIteration):
                self._has_val = False
        return self._has_val

    @staticmethod
    def _is_val(text: str) -> bool:
        return zlib.crc32(text.encode("utf-8", "replace")) % 10_000 < VAL_FRACTION * 10_000

    def train_texts(self) -> Iterable[str]:
        rows = self._rows("train")
        return rows if self.has_validation() else (t for t in rows if not self._is_val(t))

    def val_texts(self, max_chars: int) -> list[str]:
        rows = self._rows("validation") if self.has_validation() else (t for t in self._rows("train") if self._is_val(t))
        return take_chars(rows, max_chars)


def take_chars(texts: Iterable[str], max_chars: int) -> list[str]:
    """Whole documents from ``texts`` until about ``max_chars`` characters."""
    out, n = [], 0
    for t in texts:
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return out


def _token_dtype(tok):
    return np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32


def _encoded_chunks(tok, texts: Iterable[str], eos: int, batch: int = 64):
    dtype = _token_dtype(tok)
    buf = []
    for t in texts:
        buf.append(t)
        if len(buf) == batch:
            yield from (np.asarray(e.ids + [eos], dtype=dtype) for e in tok.encode_batch(buf))
            buf = []
    if buf:
        yield from (np.asarray(e.ids + [eos], dtype=dtype) for e in tok.encode_batch(buf))


def encode(tok, texts: Iterable[str], eos: int, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of ``texts``, each document followed by ``eos``, up to ``max_tokens``."""
    parts, n = [], 0
    for ids in _encoded_chunks(tok, texts, eos):
        parts.append(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=_token_dtype(tok))
    return out[:max_tokens] if max_tokens is not None else out


def cached_encode(tok, texts: Iterable[str], eos: int, cache_dir: Path, key: str,
                  max_tokens: int | None = None) -> Path:
    """Encode ``texts`` (see :func:`encode`) into an ``.npy`` file in ``cache_dir``; returns its path.

    ``key`` must identify the text (a fingerprint for in-memory documents, the dataset name
    for a stream). The stream is written to disk as it is encoded, so a dataset larger than
    memory is fine; the file is renamed into place only when complete.
    """
    h = hashlib.sha256(f"{key}|{max_tokens}".encode())
    h.update(tok.to_str().encode())
    path = Path(cache_dir) / f"tokens-{h.hexdigest()[:16]}.npy"
    if path.exists():
        return path
    raw = path.with_name(f"{path.stem}.tmp{os.getpid()}.bin")
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            dtype, n = _token_dtype(tok), 0
            with raw.open("wb") as f:
                for ids in _encoded_chunks(tok, texts, eos):
                    if max_tokens is not None:
                        ids = ids[:max_tokens - n]
                    f.write(ids.tobytes())
                    n += len(ids)
                    if max_tokens is not None and n >= max_tokens:
                        break
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
            if n:
                src = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
                for i in range(0, n, 1 << 26):
                    out[i:i + (1 << 26)] = src[i:i + (1 << 26)]
                del src
            out.flush()
            del out
            raw.unlink()
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: no partial files left in the cache
            raw.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            raise
    return path


class Batches:
    """Seeded, stateless batches of ``seq_len + 1``-token blocks from a token stream.

    ``batch(step)`` returns the (batch_size, seq_len + 1) int64 tensor for that
    optimizer step; ``rank``/``world_size`` select this process' rows for data
    parallel training (each rank gets ``batch_size // world_size`` rows).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks < 1:
            raise BenchError(f"the training text has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        if batch_size % world_size:
            raise BenchError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _block_index(self, g: int) -> int:
        epoch, i = divmod(g, self.n_blocks)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def epochs_at(self, step: int) -> float:
        return step * self.batch_size / self.n_blocks

    def batch(self, step: int) -> torch.Tensor:
        per_rank = self.batch_size // self.world_size
        return self.rows(step * self.batch_size + self.rank * per_rank, per_rank)

    def rows(self, start: int, n: int) -> torch.Tensor:
        """Sequences ``start .. start + n - 1`` of the stream, (n, seq_len + 1): ``batch(step)`` is
        ``rows(step * batch_size, batch_size)``, so a run with variable batch sizes (the adaptive
        batch schedule, which tracks its position in sequences) reads the same stream."""
        rows = []
        for g in range(start, start + n):
            b = self._block_index(g) * self.seq_len
            rows.append(np.asarray(self.tokens[b:b + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def val_blocks(tokens: np.ndarray, seq_len: int, n_seqs: int) -> torch.Tensor:
    """``n_seqs`` validation blocks spread evenly over the validation stream (so every source
    is represented); fewer if the validation text is short. The same for every run."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise BenchError(f"the validation text has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    n = min(n_seqs, available)
    starts = np.unique(np.linspace(0, available - 1, n).round().astype(np.int64)) * seq_len
    rows = [np.asarray(tokens[b:b + seq_len + 1], dtype=np.int64) for b in starts]
    return torch.from_numpy(np.stack(rows))
