"""Offline pretraining benchmark for the snsm optimizers.

Pipeline: documents (the embedded corpus, a Hugging Face dataset, or local
files) -> byte-level BPE tokenizer trained on the train split -> a randomly
initialised LLaMA -> one single-threaded worker process per optimizer, all
from the same initial weights on the same token stream -> validation curves,
optimizer-state and peak memory, step time -> ``summary.json``,
``results.md`` and ``loss.png``.

Run it with ``python -m snsm.bench`` (or ``snsm-bench``); see
:mod:`snsm.bench.cli` for the options and :mod:`snsm.bench.presets` for the
sizes and why they were chosen.
"""


class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class Terminated(KeyboardInterrupt):
    """The benchmark was sent SIGTERM: its parent stops the workers, waits for them and exits with
    status 143 (a ``KeyboardInterrupt``, so that no ``except Exception`` swallows it)."""


__all__ = ["BenchError", "Terminated"]
