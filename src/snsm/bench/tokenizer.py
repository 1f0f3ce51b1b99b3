"""Byte-level BPE tokenizer trained on the benchmark's train split.

Trained with ``tokenizers`` and cached as ``tokenizer.json`` under the cache
directory, keyed by a hash of the training text and the vocabulary size; the
run also saves it, wrapped as a ``transformers.PreTrainedTokenizerFast``, under
``<out>/tokenizer`` so it can be reused with ``from_pretrained``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .fileio import writing

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def _training_texts(texts: Sequence[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return list(texts)
    out, n = [], 0
    for t in texts:
        if n >= max_chars:
            break
        t = t[: max_chars - n]
        out.append(t)
        n += len(t)
    return out


def text_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Path, max_chars: int | None = None):
    """Train (or load from cache) a byte-level BPE with ``vocab_size`` tokens; returns a ``tokenizers.Tokenizer``.

    The last id is the end-of-text token that separates documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _training_texts(texts, max_chars)
    key = f"bpe-{vocab_size}-{text_fingerprint(texts)}"
    path = Path(cache_dir) / f"{key}.json"
    if path.exists():
        log.info("tokenizer: cached %s", path)
        return Tokenizer.from_file(str(path))
    log.info("tokenizer: training a %d-token byte-level BPE on %.1f MB of text",
             vocab_size, sum(len(t) for t in texts) / 1e6)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens([EOS])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tok.save(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tok


def eos_id(tok) -> int:
    return tok.token_to_id(EOS)


def save_pretrained(tok, out_dir: Path) -> None:
    """Save ``tok`` as a ``transformers.PreTrainedTokenizerFast`` under ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    with writing(out_dir):
        fast.save_pretrained(str(out_dir))
