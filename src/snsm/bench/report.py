"""Metrics and outputs: ``summary.json``, ``results.md`` (the table) and ``loss.png``.

Definitions (per optimizer):

* ``tokens_to_match_adamw``: the first evaluated token count at which the
  validation loss is <= AdamW's final validation loss (``null`` if never);
* ``state_bytes``: bytes of the tensors in the optimizer state (projector bases included);
* ``peak_bytes``: measured peak memory of training: on CPU the growth of
  ``ru_maxrss`` in the fresh worker process from before the model was built
  (``peak_rss_delta_bytes``, which sees LAPACK's SVD workspace and allocator
  slack), on CUDA ``torch.cuda.max_memory_allocated``; ``peak_tensor_bytes``
  is what ``MemTracker`` counts (live tensors only) over the first two steps;
* ``tokens_per_s`` and ``step_time_ratio_vs_adamw`` (the table's "train step
  vs AdamW") from CPU time per training step (forward, backward, clipping and
  the optimizer step; wall time, synchronized, on CUDA), excluding the first
  two steps; for an adaptive-batch entry, per ``batch_size * seq_len`` tokens
  (equal work);
* ``optimizer_step_time_s`` and ``optimizer_step_ratio_vs_adamw`` (the table's
  "opt step vs AdamW"): ``optimizer.step()`` alone, on the same clock as the
  training step (on CUDA synchronized before and after the call), mean per
  optimizer step over the same steps (an adaptive-batch entry too: the
  optimizer's cost does not depend on the batch); ``optimizer_step_wall_s``
  is its wall time.
* ``clip_mode``, ``in_backward`` (top level and per entry; ``--clip``, ``--in-backward``): how the
  steps were clipped and whether they ran inside backward (then ``optimizer_step_time_s`` is
  ``null``: the step is not separable from backward);
* ``grad_evals``, ``grad_evals_per_step``: gradient evaluations of the run (closure calls of an
  optimizer stepping with ``opt.step(closure)``, 2 per step for ``snsm.MetaSTORM``; else 1 per
  step), for comparisons at equal gradient evaluations;
* distributed runs (``--nproc N --parallel ddp|fsdp``; ``nproc``, ``parallel``
  and ``backend`` at the top level): step time is rank 0's wall time,
  ``peak_bytes`` rank 0's, ``state_bytes`` what one rank holds (under FSDP
  its shards plus the replicated tensors), and there is no MemTracker peak;
* adaptive-batch entries (``batch_schedule: "adaptive"``) also carry
  ``steps`` (optimizer steps taken), ``batch_history`` (change points
  ``[step, tokens before it, batch size]``), ``final_batch_size``,
  ``max_batch_size``, ``batch_eta``, ``micro_batch`` and ``train_step_time_s``
  (the training step per optimizer step).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, save_figure

log = logging.getLogger(__name__)

REQUIRED = ("name", "lr", "final_val_loss", "final_val_ppl", "tokens_to_match_adamw", "state_bytes",
            "peak_bytes", "tokens_per_s", "step_time_ratio_vs_adamw", "optimizer_step_time_s",
            "optimizer_step_ratio_vs_adamw", "curve")


def tokens_to_match(curve: list[list[float]] | None, target: float | None) -> int | None:
    """First evaluated token count whose validation loss is <= ``target``; None if never (or no target)."""
    if target is None or not curve:
        return None
    for tokens, loss in curve:
        if loss is not None and math.isfinite(loss) and loss <= target:
            return int(tokens)
    return None


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def build_summary(meta: dict[str, Any], results: list[dict]) -> dict[str, Any]:
    """The summary: ``meta`` at the top level and one entry per optimizer, AdamW-relative columns filled in."""
    ref = next((r for r in results if r.get("optimizer") == "adamw" and r.get("status") == "done"), None)
    ref_final = ref.get("final_val_loss") if ref else None
    entries = []
    for r in results:
        e = {k: None for k in REQUIRED}
        e.update({k: v for k, v in r.items() if k not in ("status",)})
        e["name"] = r["name"]
        if r.get("status") != "done":
            e["skipped"] = True
            e.setdefault("reason", r.get("status", "not run"))
            e["curve"] = e.get("curve") or []
            entries.append(e)
            continue
        e["skipped"] = False
        cuda = r.get("peak_cuda_bytes") is not None
        e["peak_bytes"] = r.get("peak_cuda_bytes") if cuda else r.get("peak_rss_delta_bytes")
        e["peak_bytes_source"] = "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss delta in the worker"
        e["tokens_to_match_adamw"] = tokens_to_match(r.get("curve"), ref_final)
        e["step_time_ratio_vs_adamw"] = _ratio(r.get("step_time_s"), ref.get("step_time_s") if ref else None)
        e["optimizer_step_ratio_vs_adamw"] = _ratio(r.get("optimizer_step_time_s"),
                                                    ref.get("optimizer_step_time_s") if ref else None)
        e["state_ratio_vs_adamw"] = _ratio(r.get("state_bytes"), ref.get("state_bytes") if ref else None)
        e["tokens_to_match_ratio"] = _ratio(e["tokens_to_match_adamw"], ref.get("tokens") if ref else None)
        entries.append(e)
    return {**meta, "reference": "adamw" if ref else None, "adamw_final_val_loss": ref_final,
            "optimizers": entries}


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.2f}"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def _tokens(t):
    if t is None:
        return "never"
    return f"{t / 1e6:.2f}M" if t >= 1e6 else (f"{t / 1e3:.0f}k" if t >= 1e3 else f"{t}")


def run_note(summary: dict[str, Any]) -> str:
    """Lines saying how a run was stepped (when not the recipe's ordinary steps with a global clip) and
    how a distributed run was run ("" for neither)."""
    return "\n\n".join(part for part in (_stepping_note(summary), _distributed_note(summary)) if part)


def _stepping_note(summary: dict[str, Any]) -> str:
    mode, inside = summary.get("clip_mode") or "global", summary.get("in_backward")
    if mode == "global" and not inside:
        return ""
    clip = "no clipping" if mode == "none" else f"clip {mode!r} at {summary.get('clip')}"
    if not inside:
        return f"Ordinary steps, {clip}."
    return (f"Every parameter stepped inside backward ({clip}): the optimizer's step cannot be timed apart from "
            "backward (\"opt step\" is -); the train step includes it.")


def _distributed_note(summary: dict[str, Any]) -> str:
    n = summary.get("nproc") or 1
    if n < 2:
        return ""
    how = {"ddp": "DistributedDataParallel",
           "fsdp": "FSDP2: fully_shard per transformer block and root"}.get(summary.get("parallel"), "?")
    return (f"{n}-process {summary.get('parallel')} run ({how}, {summary.get('backend')}): each process trains on "
            f"{summary['batch_size'] // n} of the {summary['batch_size']} sequences of every batch; step time is "
            f"rank 0's wall time, memory and optimizer state what rank 0 holds.")


def format_table(summary: dict[str, Any]) -> str:
    """The results table in Markdown."""
    head = ("| optimizer | lr | final val loss | val ppl | tokens to AdamW's final | state MiB | state vs AdamW "
            "| peak MiB (RSS Δ) | peak MiB (tensors) | tokens/s | train step vs AdamW | opt step vs AdamW |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for e in summary["optimizers"]:
        if e.get("skipped"):
            lines.append(f"| {e['name']} | {_num(e.get('lr'), 'g')} | skipped: {e.get('reason', '')} |"
                         + " |" * 9)
            continue
        lines.append("| " + " | ".join([
            e["name"], _num(e["lr"], "g"), _num(e["final_val_loss"], ".4f"), _num(e["final_val_ppl"], ".2f"),
            _tokens(e["tokens_to_match_adamw"]) if summary.get("reference") else "-",
            _mib(e["state_bytes"]), _num(e.get("state_ratio_vs_adamw"), ".2f"),
            _mib(e.get("peak_cuda_bytes") if e.get("peak_cuda_bytes") is not None else e.get("peak_rss_delta_bytes")),
            _mib(e.get("peak_tensor_bytes")), _num(e["tokens_per_s"], ",.0f"),
            _num(e["step_time_ratio_vs_adamw"], ".2f"), _num(e.get("optimizer_step_ratio_vs_adamw"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


def format_adaptive(summary: dict[str, Any]) -> str:
    """One line per adaptive-batch entry: optimizer steps and the batch-size history."""
    lines = []
    for e in summary["optimizers"]:
        if e.get("skipped") or e.get("batch_schedule") != "adaptive":
            continue
        hist = e.get("batch_history") or []
        grew = ", ".join(f"{b} from step {st} ({_tokens(t)} tokens)" if b > prev[2] else
                         f"{b} at step {st} (the last batch, cut to the token budget)"
                         for prev, (st, t, b) in zip(hist, hist[1:])) or "never grew"
        start = hist[0][2] if hist else summary.get("batch_size")
        lines.append(f"* `{e['name']}`: {e['steps']} optimizer steps (fixed batch: {summary.get('steps')}) for "
                     f"{_tokens(e['tokens'])} tokens; batch {start} -> {e.get('final_batch_size')} (cap "
                     f"{e.get('max_batch_size')}, micro-batch {e.get('micro_batch')}, eta {e.get('batch_eta')}): {grew}.")
    if not lines:
        return ""
    return ("Adaptive batch size (`snsm.AdaptiveBatchSize`, norm test on the gradient-accumulation micro-batches; "
            "the last batch is cut to the token budget; its step time is per "
            f"{summary.get('batch_size')} x {summary.get('seq_len')} tokens):\n\n" + "\n".join(lines) + "\n")


def _timing_note(s: dict[str, Any]) -> str:
    if (s.get("nproc") or 1) > 1:
        clock = "rank 0's wall time, communication included"
    elif str(s.get("device", "cpu")).startswith("cuda"):
        clock = "wall time, CUDA synchronized"
    else:
        clock = "CPU time, one thread per worker"
    return ("Train step: the whole training step (forward, backward, clipping, optimizer step); opt step: "
            f"`optimizer.step()` alone; both {clock}, mean per step after the first two, as a ratio to AdamW's.")


def format_results_md(summary: dict[str, Any]) -> str:
    s = summary
    out = [
        f"# snsm benchmark: preset `{s['preset']}`",
        "",
        f"Model `{s['model']}` ({s['n_params'] / 1e6:.2f}M parameters, {s['n_params_linear'] / 1e6:.2f}M in "
        f"nn.Linear weights), vocabulary {s['vocab_size']}, sequence {s['seq_len']}, batch {s['batch_size']}, "
        f"{s['steps']} steps = {s['tokens'] / 1e6:.2f}M training tokens per optimizer; validation on "
        f"{s['val_tokens'] / 1e3:.0f}k tokens every {s['eval_every']} steps. Data: {s['data']}. "
        f"Seed {s['seed']}, device {s['device']}, torch {s['torch_version']}, subspace rank {s['rank']}, "
        f"projector refresh every {s['proj_gap']} steps.",
        "",
        *([run_note(s), ""] if run_note(s) else []),
        f"Command: `{s['command']}`",
        "",
        format_table(s),
        "",
        "Tokens to AdamW's final: first evaluated token count with validation loss <= AdamW's final "
        f"({_num(s.get('adamw_final_val_loss'), '.4f')}). State: optimizer-state tensors. Peak: "
        "growth of the worker's max RSS (GPU: max allocated) and MemTracker's live-tensor peak. "
        + _timing_note(s),
        "",
        *([format_adaptive(s)] if format_adaptive(s) else []),
        "![validation loss](loss.png)",
        "",
    ]
    return "\n".join(out)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Validation loss vs training tokens, every optimizer on one plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    for i, e in enumerate(summary["optimizers"]):
        curve = [c for c in (e.get("curve") or []) if c[1] is not None]
        if e.get("skipped") or not curve:
            continue
        xs = [c[0] / 1e6 for c in curve]
        ys = [c[1] for c in curve]
        ref_line = e.get("optimizer", e["name"]) == "adamw"
        baseline = e.get("optimizer", e["name"]) in ("adafactor", "galore", "adam-mini", "muon")
        style = "--" if baseline else (":" if e.get("batch_schedule") == "adaptive" else "-")
        ax.plot(xs, ys, style, marker="o", ms=3, lw=2.5 if ref_line else 1.5,
                color="black" if ref_line else colors[i % len(colors)], label=f"{e['name']} (lr {e['lr']:g})")
    ref = summary.get("adamw_final_val_loss")
    if ref is not None:
        ax.axhline(ref, color="gray", lw=0.8, ls=":", label="AdamW final")
    finals = [e["final_val_loss"] for e in summary["optimizers"] if not e.get("skipped") and e.get("final_val_loss")]
    if finals:  # zoom on the interesting part: the initial loss is far above everything else
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.1 * max(hi - lo, 0.2), hi + 1.5 * max(hi - lo, 0.5))
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss")
    n = summary.get("nproc") or 1
    ax.set_title(f"{summary['model']} ({summary['n_params'] / 1e6:.1f}M params), preset {summary['preset']}"
                 + (f", {n}-process {summary.get('parallel')}" if n > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "results.md", format_results_md(summary))
    plot(summary, out / "loss.png")
