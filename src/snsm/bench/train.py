"""Training one job (one optimizer at one learning rate) in this process: :func:`run_job`.

The scheduler that gives every job its own fresh, single-threaded worker process (and runs a
distributed job under torchrun) is :mod:`snsm.bench.launch`, above this module. Every job loads the
same initial weights (``init_model.pt``) and reads the same token stream
(:class:`~snsm.bench.textdata.Batches`).

Recipe (the paper's): cosine schedule with linear warm-up over the first 10%
of steps, decaying to 10% of the peak lr; gradient clipping at 1.0; weight
decay 0. Validation loss is evaluated at step 0, every ``eval_every`` steps and
at the end, on the same validation sequences for every job.

A job writes ``checkpoint.pt`` every ``ckpt_every`` steps, atomically (write to
a temporary file, then rename), holding the model, the optimizer state
(tensors and plain numbers only: it loads with ``torch.load(weights_only=True)``),
the scheduler, the data position, the RNG states, the curve and the timings so
far (see :mod:`snsm.bench.checkpoint`); a resumed job continues from it and
ends bit-identical to an uninterrupted one. At the end it writes
``result.json`` and ``curve.csv``.

Measured per job: CPU time per training step (wall time with device sync on
GPU; ``step_time_s``: forward, backward, clipping and the optimizer step), the
time of ``optimizer.step()`` alone on the same clock (``optimizer_step_time_s``;
on CUDA synchronized before and after the call; ``optimizer_step_wall_s`` its
wall time), both the mean over the steps after the first two, the
optimizer-state bytes, and the peak memory of a training step as seen by
``torch.distributed._tools.mem_tracker.MemTracker`` (tensor bytes, over the
first two steps) and by ``ru_maxrss`` minus its value before the model was
built (which also sees LAPACK workspace, allocator slack, ...); on CUDA
``torch.cuda.max_memory_allocated``.

Adaptive batch size (``--batch-schedule adaptive`` or the ``+adaptive``
entries): :class:`snsm.AdaptiveBatchSize` (AdAdaGrad's norm test, variance
estimated from the gradient-accumulation micro-batches) picks each step's
batch, a multiple of the micro-batch (``--micro-batch``; default a quarter of
``--batch-size``, so a step starts with 4 micro-batches), starting at
``--batch-size``, never shrinking, capped at ``--max-batch-size``. The job
counts tokens (the sum of its batch sizes times the sequence length), reads
the same sequence stream as a fixed-batch job (:meth:`Batches.rows`), stops at
the same training-token budget (``steps * batch_size * seq_len``; its last
batch is cut to what is left), runs the warm-up/cosine schedule and the
evaluations by tokens (an evaluation at the first step at or past each
``eval_every * batch_size * seq_len`` tokens), keeps the controller's state in
its checkpoints (resume is exact) and reports the batch-size history (change
points ``[step, tokens before the step, batch size]``) in its result. Its
``step_time_s`` is CPU time per ``batch_size * seq_len`` tokens (so the
"train step vs AdamW" column compares equal work); ``train_step_time_s`` is
the training step per optimizer step, and ``optimizer_step_time_s`` is per
optimizer step too (its cost does not depend on the batch).

Distributed jobs (``--nproc N --parallel ddp|fsdp``, see :mod:`snsm.bench.launch`):
the job's worker runs the job as N torchrun processes; :func:`run_job` then
takes a :class:`~snsm.bench.launch.Group`, wraps the model, reads its rank's
share of every batch, averages the training loss and sums the evaluation over
the ranks, and writes the checkpoint and results from rank 0. Its step time is
rank 0's wall time (communication included), its memory rank 0's (RSS growth,
or CUDA max allocated; no MemTracker), and ``state_bytes`` / ``param_bytes``
count the tensors one rank holds (FSDP: its shards). The adaptive batch size
is one-process only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path

from . import checkpoint
from .fileio import atomic_write_text

log = logging.getLogger(__name__)


def cosine_with_warmup(total_steps: int, warmup_frac: float, min_ratio: float):
    """lr multiplier at (0-based) scheduler step ``s``: linear warm-up, then cosine down to ``min_ratio``."""
    warmup = max(1, int(round(warmup_frac * total_steps)))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the same high-water mark as
    ``ru_maxrss``, but of this process image only (``ru_maxrss`` of a freshly spawned
    worker starts at its parent's RSS at fork time, which would hide the worker's own peak).
    Elsewhere ``ru_maxrss``.
    """
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def reset_peak_rss() -> None:
    """Reset the RSS high-water mark to the current RSS where the OS allows it (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _load_tokens(path: str):
    import numpy as np
    # Small streams are read into anonymous memory before the RSS baseline, so that pages of a
    # memory-mapped file touched during training do not show up as optimizer memory.
    return np.load(path) if os.path.getsize(path) < (1 << 30) else np.load(path, mmap_mode="r")


def train_step(model, opt, block, micro_batch: int | None, clip: float, device, autocast_dtype=None,
               observe=None, tracker=None) -> tuple[float, float, float]:
    """One optimizer step on ``block`` (batch, seq_len + 1), in micro-batches.

    Returns ``(loss, opt_cpu, opt_wall)``: the mean loss, and the process CPU time and the wall time
    of ``opt.step()`` alone (on CUDA between two ``torch.cuda.synchronize``, so that neither the
    pending backward nor the step's own kernels are misplaced).

    ``observe(samples)``, if given, is called after each micro-batch's ``backward()`` (before
    clipping): the adaptive batch-size controller reads the accumulating gradients there.
    ``tracker``: the active ``MemTracker``, whose per-module statistics are reset between
    micro-batches (it refuses a second forward of the same module otherwise; its global peak stays)."""
    import torch
    from .model import lm_loss

    n = block.size(0)
    micro = micro_batch or n
    total = 0.0
    for i in range(0, n, micro):
        if tracker is not None and i:
            tracker.reset_mod_stats()
        x = block[i:i + micro].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = lm_loss(model, x) * (x.size(0) / n)
        loss.backward()
        if observe is not None:
            observe(x.size(0))
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    c0, w0 = time.process_time(), time.perf_counter()
    opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    opt_cpu, opt_wall = time.process_time() - c0, time.perf_counter() - w0
    opt.zero_grad(set_to_none=True)
    return total, opt_cpu, opt_wall


def evaluate(model, blocks, batch: int, device, autocast_dtype=None, group=None) -> float:
    """Mean next-token loss over the validation blocks.

    With a :class:`~snsm.bench.launch.Group` each rank evaluates its share of the blocks, in the
    same number of forward passes on every rank (FSDP needs every rank in every forward: a rank
    whose share has run out runs a zero-weight one), and the sums are all-reduced."""
    import torch
    from .model import lm_loss

    share, world = blocks, 1
    if group is not None:
        share, world = blocks.tensor_split(group.world)[group.rank], group.world
    largest_share = -(-blocks.size(0) // world)
    rounds = -(-largest_share // batch)  # forward passes per rank, the same on every rank
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, rounds * batch, batch):
            x = share[i:i + batch]
            weight = x.size(0)
            x = (x if weight else blocks[:1]).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                total += float(lm_loss(model, x)) * weight
            count += weight
    model.train()
    if group is not None:
        total, count = group.sum([total, count])
    return total / count


def _import_everything(optimizer: str) -> None:
    """Import what training will import, so the RSS baseline taken afterwards holds the libraries."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401

    from .optimizers import preload
    preload(optimizer)


def _memtracker_peak(tracker) -> int | None:
    snap = tracker.get_tracker_snapshot("peak")
    totals = [v.get("Total", 0) for v in snap.values()]
    return int(max(totals)) if totals else None


def _local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _train(job: dict, progress, group=None) -> dict:
    """Train one job (on one rank of a distributed job if ``group`` is given); returns its result.
    ``progress``: a :class:`~snsm.bench.progress.Progress` or anything with its ``send``."""
    import torch

    from .model import build_model, count_params, model_size
    from .optimizers import REGISTRY, BuildContext, state_bytes
    from .textdata import Batches, val_blocks

    torch.set_num_threads(job["threads"])
    device = group.device if group is not None else torch.device(job["device"])
    cuda = device.type == "cuda"
    rank0 = group is None or group.rank == 0
    sharded = group is not None and group.sharded
    wall_time = cuda or group is not None  # distributed: rank 0's wall time, communication included
    amp = torch.bfloat16 if cuda else None
    jobdir = Path(job["dir"])
    steps, seq, bsz = job["steps"], job["seq_len"], job["batch_size"]
    tokens_per_step = seq * bsz

    batches = Batches(_load_tokens(job["train_tokens"]), seq, bsz, job["seed"],
                      *((group.rank, group.world) if group is not None else ()))
    val = val_blocks(_load_tokens(job["val_tokens"]), seq, job["eval_seqs"])
    _import_everything(job["optimizer"])
    import gc
    gc.collect()
    reset_peak_rss()
    rss0 = rss_bytes()
    log.info("%s: ru_maxrss before building the model: %.1f MiB", job["name"], rss0 / 2**20)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    model = build_model(job["model"], job["vocab_size"], seq, job["seed"])
    model.load_state_dict(torch.load(job["init_path"], weights_only=True))
    model.to(device)
    # ``model`` trains (DDP's wrapper); ``inner`` is what the optimizer, evaluation and checkpoints see
    model, inner = group.wrap(model) if group is not None else (model, model)
    size = model_size(job["model"])
    ctx = BuildContext(rank=job["rank"], proj_gap=job["proj_gap"], hidden=size.hidden, heads=size.heads,
                       seed=job["seed"], aux_lr=job.get("aux_lr"))
    opt = REGISTRY[job["optimizer"]].build(inner, job["lr"], ctx)
    run = {"step": 0, "curve": [], "train_loss": [], "step_time": 0.0, "step_wall": 0.0, "timed_steps": 0,
           # optimizer.step() alone, on the clock of step_time, and its wall time, over opt_timed_steps
           "opt_time": 0.0, "opt_wall": 0.0, "opt_timed_steps": 0,
           "peak_tensor_bytes": None, "peak_rss_delta_bytes": 0, "peak_cuda_bytes": None, "diverged": False}
    factor = cosine_with_warmup(steps, job["warmup_frac"], job["min_lr_ratio"])
    adaptive = job.get("batch_schedule") == "adaptive"
    train_tokens = steps * tokens_per_step
    ctl = None
    if adaptive:
        import snsm
        ctl = snsm.AdaptiveBatchSize(bsz, job["max_batch_size"], test="norm", eta=job["batch_eta"],
                                     granularity=job["micro_batch"])
        run.update({"tokens": 0, "timed_tokens": 0, "batch_history": []})
        # the schedule by tokens: "step" s of the fixed-batch schedule is s * batch_size * seq_len tokens
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: factor(run["tokens"] / tokens_per_step))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def tokens_now() -> int:
        return run["tokens"] if adaptive else run["step"] * tokens_per_step

    def finished() -> bool:
        return run["tokens"] >= train_tokens if adaptive else run["step"] >= steps
    ckpt_path = jobdir / "checkpoint.pt"
    if job.get("resume") and ckpt_path.exists():
        checkpoint.restore(ckpt_path, job, inner, opt, sched, run, device, ctl)
        log.info("resumed %s at step %d", job["name"], run["step"])

    def save_checkpoint() -> None:
        checkpoint.save(ckpt_path, job, inner, opt, sched, run, device, ctl, sharded=sharded, rank0=rank0)

    def eval_now() -> None:
        loss = evaluate(inner, val, job["eval_batch"], device, amp, group)
        run["curve"].append([tokens_now(), loss])
        progress.send("eval", run["step"], loss)

    eval_tokens = job["eval_every"] * tokens_per_step
    stop_at = run["step"] + job["stop_after"] if job.get("stop_after") else None
    ema = None
    observe = None
    while not finished():
        step = run["step"]
        # evaluate at step 0 and at the first step at or past every eval_every * tokens_per_step tokens
        if not run["curve"] or run["curve"][-1][0] // eval_tokens < tokens_now() // eval_tokens:
            eval_now()
        if adaptive:
            b = min(ctl.batch_size, (train_tokens - run["tokens"]) // seq)  # the last batch: what is left
            block = batches.rows(run["tokens"] // seq, b)
            if not run["batch_history"] or run["batch_history"][-1][2] != b:
                run["batch_history"].append([step, run["tokens"], b])
            observe = None if b < 2 * job["micro_batch"] else (lambda n: ctl.observe(model, samples=n))
        else:
            block = batches.batch(step)
        tracker = None
        if step < 2 and not cuda and group is None:
            from torch.distributed._tools.mem_tracker import MemTracker
            tracker = MemTracker()
            tracker.track_external(model, opt)
        if cuda:
            torch.cuda.synchronize(device)
        c0, w0 = time.process_time(), time.perf_counter()
        if tracker is not None:
            with tracker:
                loss, opt_cpu, opt_wall = train_step(model, opt, block, job["micro_batch"], job["clip"], device,
                                                     amp, observe, tracker)
            peak = _memtracker_peak(tracker)
            run["peak_tensor_bytes"] = max(run["peak_tensor_bytes"] or 0, peak or 0) or None
        else:
            loss, opt_cpu, opt_wall = train_step(model, opt, block, job["micro_batch"], job["clip"], device, amp,
                                                 observe)
        if group is not None:
            loss = group.mean(loss)  # the global batch's loss, the same on every rank
        if cuda:
            torch.cuda.synchronize(device)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if adaptive:
            run["tokens"] += block.size(0) * seq
            if observe is not None:
                ctl.update()  # the next step's batch size
            else:
                ctl.reset()
        sched.step()
        run["step"] = step + 1
        if step >= 2:  # the first two steps run under MemTracker (CPU) or warm up kernels (GPU)
            run["step_time"] += wall if wall_time else cpu
            run["step_wall"] += wall
            run["timed_steps"] += 1
            run["opt_time"] += opt_wall if wall_time else opt_cpu
            run["opt_wall"] += opt_wall
            run["opt_timed_steps"] += 1
            if adaptive:
                run["timed_tokens"] += block.size(0) * seq
        run["train_loss"].append(loss)
        if not math.isfinite(loss):
            run["diverged"] = True
            log.warning("%s: non-finite training loss at step %d; stopping", job["name"], step + 1)
            break
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        per_step = run["step_time"] / run["timed_steps"] if run["timed_steps"] else (wall if wall_time else cpu)
        tps = tokens_per_step / max(per_step, 1e-9)
        if adaptive:
            tps = run["timed_tokens"] / max(run["step_time"], 1e-9) if run["timed_steps"] else 0.0
        progress.send("step", tokens_now() // tokens_per_step, steps, ema, tps)
        run["peak_rss_delta_bytes"] = max(run["peak_rss_delta_bytes"], rss_bytes() - rss0)
        if cuda:
            run["peak_cuda_bytes"] = max(run["peak_cuda_bytes"] or 0, torch.cuda.max_memory_allocated(device))
        if run["step"] % job["ckpt_every"] == 0 or (stop_at is not None and run["step"] >= stop_at):
            save_checkpoint()
        if stop_at is not None and run["step"] >= stop_at and not finished():
            return {"name": job["name"], "status": "stopped", "step": run["step"]}

    log.info("%s: ru_maxrss at the end: %.1f MiB", job["name"], rss_bytes() / 2**20)
    if not run["diverged"] and (not run["curve"] or run["curve"][-1][0] != tokens_now()):
        eval_now()
    params = count_params(inner)
    final = run["curve"][-1][1] if run["curve"] and not run["diverged"] else None
    per_step = run["step_time"] / run["timed_steps"] if run["timed_steps"] else None
    per_wall = run["step_wall"] / run["timed_steps"] if run["timed_steps"] else None
    n_opt = run["opt_timed_steps"]
    opt_per_step = run["opt_time"] / n_opt if n_opt else None  # per optimizer step, also for adaptive jobs
    opt_per_wall = run["opt_wall"] / n_opt if n_opt else None
    extra = {"batch_schedule": "adaptive" if adaptive else "fixed"}
    if group is not None:
        extra.update({"nproc": group.world, "parallel": group.parallel, "backend": group.backend})
    if adaptive:
        extra.update({
            "train_step_time_s": per_step, "micro_batch": job["micro_batch"], "max_batch_size": job["max_batch_size"],
            "batch_eta": job["batch_eta"], "batch_test": "norm", "batch_history": run["batch_history"],
            # the largest batch used (the batch never shrinks; only the very last one may be cut)
            "final_batch_size": max((b for _, _, b in run["batch_history"]), default=bsz),
        })
        timed = run["timed_tokens"]
        per_step = run["step_time"] * tokens_per_step / timed if timed else None  # per tokens_per_step tokens
        per_wall = run["step_wall"] * tokens_per_step / timed if timed else None
    return {
        "name": job["name"], "optimizer": job["optimizer"], "lr": job["lr"], "status": "done",
        "final_val_loss": final, "final_val_ppl": math.exp(final) if final is not None else None,
        "diverged": run["diverged"], "steps": run["step"], "tokens": tokens_now(),
        "state_bytes": state_bytes(opt), "param_bytes": _local_bytes(inner.parameters()),
        "n_params": params["total"],
        "peak_tensor_bytes": run["peak_tensor_bytes"], "peak_rss_delta_bytes": run["peak_rss_delta_bytes"],
        "peak_cuda_bytes": run["peak_cuda_bytes"],
        "step_time_s": per_step, "step_wall_s": per_wall,
        "optimizer_step_time_s": opt_per_step, "optimizer_step_wall_s": opt_per_wall,
        "step_time_kind": ("wall, rank 0" if group is not None else "wall") + (" (cuda synchronized)" if cuda else "")
        if wall_time else "process CPU time",
        "tokens_per_s": tokens_per_step / per_step if per_step else None,
        "final_train_loss": run["train_loss"][-1] if run["train_loss"] else None,
        "curve": run["curve"], **extra,
    }


def run_job(job: dict, progress, group=None) -> str:
    """Train one job and (on rank 0) write ``result.json`` and ``curve.csv`` unless it stopped
    early; a failure becomes a ``failed`` result. Returns the status.

    ``progress``: where the job's progress messages go (:mod:`snsm.bench.progress`); ``group``: this
    process' :class:`~snsm.bench.launch.Group` in a distributed job, None for a one-process job."""
    from .optimizers import PeerUnavailable
    jobdir = Path(job["dir"])
    try:
        result = _train(job, progress, group)
    except PeerUnavailable as e:
        result = {"name": job["name"], "optimizer": job["optimizer"], "lr": job["lr"], "status": "skipped",
                  "skipped": True, "reason": str(e)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        logging.getLogger(__name__).error("%s failed:\n%s", job["name"], traceback.format_exc())
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, stack)}
        if isinstance(failures, dict) and failures:
            e = next(iter(failures.values()))[0]
        first = str(e).splitlines()[0] if str(e) else ""
        result = {"name": job["name"], "optimizer": job["optimizer"], "lr": job["lr"], "status": "failed",
                  "skipped": True, "reason": f"failed: {type(e).__name__}: {first} (see {jobdir / 'worker.log'})"}
    if result["status"] != "stopped" and (group is None or group.rank == 0):
        atomic_write_text(jobdir / "result.json", json.dumps(result, indent=1))
        if result.get("curve"):
            atomic_write_text(jobdir / "curve.csv",
                              "tokens,val_loss\n" + "".join(f"{t},{v:.6f}\n" for t, v in result["curve"]))
    return result["status"]
