"""Progress messages from the jobs to the parent's progress bars.

A message is a tuple ``(kind, job name, ...)``: ``("step", name, step, total, loss_ema, tokens_per_s)``,
``("eval", name, step, val_loss)`` or ``("done", name, status)``. A one-process job's worker sends
them through a ``multiprocessing`` queue (:class:`Progress`); rank 0 of a distributed job prints
them as JSON lines on stdout (:class:`StdoutProgress`), which its worker reads back
(:func:`parse_line`) and forwards through the queue. The parent shows them in :class:`Bars`.

A lowest-layer module: it imports nothing from the rest of the package.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)

PREFIX = "@snsm-bench-progress "


class Progress:
    """Sends a job's progress messages to the parent through queue ``q`` (drops them if ``q`` is None)."""

    def __init__(self, q, name: str):
        self.q, self.name = q, name

    def send(self, *msg) -> None:
        if self.q is not None:
            try:
                self.q.put((msg[0], self.name) + msg[1:])
            except Exception:  # a progress message must never stop training
                pass


class StdoutProgress:
    """Rank 0's progress messages, as JSON lines on stdout, for its worker to relay (:func:`parse_line`)."""

    def send(self, *msg) -> None:
        try:
            print(PREFIX + json.dumps(msg), flush=True)
        except Exception:  # a progress message must never stop training
            pass


def parse_line(line: str) -> list | None:
    """The message a :class:`StdoutProgress` line carries (without the job name); None for any other line."""
    if not line.startswith(PREFIX):
        return None
    return json.loads(line[len(PREFIX):])


class Bars:
    """One progress bar per job (tqdm, on stderr), fed by the workers' messages."""

    def __init__(self, names: list[str], totals: dict[str, int], enabled: bool):
        self.bars = {}
        self.enabled = enabled
        self.last_log = {}
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.enabled = False
            return
        width = max(len(n) for n in names)
        for i, n in enumerate(names):
            self.bars[n] = tqdm(total=totals[n], desc=n.ljust(width), position=i, leave=True, unit="step",
                                dynamic_ncols=True, mininterval=0.5)

    def handle(self, msg) -> None:
        kind, name = msg[0], msg[1]
        bar = self.bars.get(name)
        if kind == "step":
            step, total, loss, tps = msg[2:]
            if bar is not None:
                bar.n = step
                bar.set_postfix_str(f"loss {loss:.3f}, {tps:,.0f} tok/s", refresh=False)
                bar.refresh()
            elif time.monotonic() - self.last_log.get(name, 0) > 30:
                self.last_log[name] = time.monotonic()
                log.info("%s: step %d/%d loss %.3f %.0f tok/s", name, step, total, loss, tps)
        elif kind == "eval":
            step, loss = msg[2:]
            log.debug("%s: step %d val loss %.4f", name, step, loss)
        elif kind == "done":
            log.info("%s: %s", name, msg[2])

    def finish(self, name: str) -> None:
        bar = self.bars.get(name)
        if bar is not None:
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
