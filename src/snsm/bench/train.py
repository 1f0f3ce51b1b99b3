"""Training: one worker process per optimizer, and the parent that schedules them.

Each job (one optimizer at one learning rate) runs in a fresh ``spawn``-ed
process with one intra-op thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``): on a small CPU machine, two single-threaded processes
are about 3x faster in total than two 2-thread ones, whose threads spin-wait
against each other. A fresh process also makes its ``ru_maxrss`` a clean
peak-memory measurement. Every job loads the same initial weights
(``init_model.pt``) and reads the same token stream (:class:`~snsm.bench.data.Batches`).

Recipe (the paper's): cosine schedule with linear warm-up over the first 10%
of steps, decaying to 10% of the peak lr; gradient clipping at 1.0; weight
decay 0. Validation loss is evaluated at step 0, every ``eval_every`` steps and
at the end, on the same validation sequences for every job.

A job writes ``checkpoint.pt`` every ``ckpt_every`` steps, atomically (write to
a temporary file, then rename), holding the model, the optimizer state
(tensors and plain numbers only: it loads with ``torch.load(weights_only=True)``),
the scheduler, the data position, the RNG states and the curve so far; a
resumed job continues from it and ends bit-identical to an uninterrupted one.
At the end it writes ``result.json`` and ``curve.csv``.

Measured per job: CPU time per step (wall time with device sync on GPU), the
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
"step time vs AdamW" column compares equal work); ``opt_step_time_s`` is per
optimizer step.

Distributed jobs (``--nproc N --parallel ddp|fsdp``, see :mod:`snsm.bench.launch`):
the job's worker runs the job as N torchrun processes; :func:`_train` then
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
import queue as queue_mod
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
               observe=None, tracker=None) -> float:
    """One optimizer step on ``block`` (batch, seq_len + 1), in micro-batches; returns the mean loss.

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
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


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

    from .optimizers import REGISTRY, _quiet
    package = REGISTRY[optimizer].package
    try:
        with _quiet():
            if package == "galore-torch":
                import galore_torch  # noqa: F401
            elif package == "adam-mini":
                import adam_mini  # noqa: F401
            elif package is None:
                import snsm  # noqa: F401
    except Exception:  # reported properly when the optimizer is built
        pass


def _memtracker_peak(tracker) -> int | None:
    snap = tracker.get_tracker_snapshot("peak")
    totals = [v.get("Total", 0) for v in snap.values()]
    return int(max(totals)) if totals else None


class _Progress:
    def __init__(self, q, name: str):
        self.q, self.name = q, name

    def send(self, *msg) -> None:
        if self.q is not None:
            try:
                self.q.put((msg[0], self.name) + msg[1:])
            except Exception:  # a progress message must never stop training
                pass


def _local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _train(job: dict, progress: _Progress, group=None) -> dict:
    """Train one job (on one rank of a distributed job if ``group`` is given); returns its result."""
    import torch

    from .model import build_model, count_params, model_size
    from .textdata import Batches, val_blocks
    from .optimizers import REGISTRY, BuildContext, export_state, import_state, state_bytes

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
        ck = torch.load(ckpt_path, weights_only=True, map_location=device)
        if ck["job"] != _identity(job):
            from . import BenchError
            raise BenchError(f"{ckpt_path} was written by a different configuration; use a new --out")
        if "dcp" in ck:
            from .launch import load_sharded
            load_sharded(inner, opt, jobdir / ck["dcp"])
        else:
            inner.load_state_dict(ck["model"])
            import_state(opt, ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if cuda and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        run.update(ck["run"])
        if ctl is not None:
            ctl.load_state_dict(ck["batch"])
        assert ck["data"]["step"] == run["step"]
        log.info("resumed %s at step %d", job["name"], run["step"])

    def save_checkpoint() -> None:
        if sharded:  # every rank writes its shards; checkpoint.pt names the directory once it is complete
            from .launch import save_sharded
            states = {"dcp": f"dcp-step{run['step']}"}
            save_sharded(inner, opt, jobdir / states["dcp"])
        elif rank0:
            states = {"model": inner.state_dict(), "optimizer": export_state(opt)}
        if not rank0:
            return
        atomic_torch_save({
            "job": _identity(job), **states,
            "scheduler": sched.state_dict(), "data": {"step": run["step"], "seed": job["seed"]},
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None},
            "run": run, **({"batch": ctl.state_dict()} if ctl is not None else {}),
        }, ckpt_path)
        if sharded:
            import shutil
            for old in jobdir.glob("dcp-step*"):
                if old.name != states["dcp"]:
                    shutil.rmtree(old, ignore_errors=True)

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
                loss = train_step(model, opt, block, job["micro_batch"], job["clip"], device, amp, observe,
                                  tracker)
            peak = _memtracker_peak(tracker)
            run["peak_tensor_bytes"] = max(run["peak_tensor_bytes"] or 0, peak or 0) or None
        else:
            loss = train_step(model, opt, block, job["micro_batch"], job["clip"], device, amp, observe)
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
    extra = {"batch_schedule": "adaptive" if adaptive else "fixed"}
    if group is not None:
        extra.update({"nproc": group.world, "parallel": group.parallel, "backend": group.backend})
    if adaptive:
        extra.update({
            "opt_step_time_s": per_step, "micro_batch": job["micro_batch"], "max_batch_size": job["max_batch_size"],
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
        "step_time_kind": ("wall, rank 0" if group is not None else "wall") + (" (cuda synchronized)" if cuda else "")
        if wall_time else "process CPU time",
        "tokens_per_s": tokens_per_step / per_step if per_step else None,
        "final_train_loss": run["train_loss"][-1] if run["train_loss"] else None,
        "curve": run["curve"], **extra,
    }


_IDENTITY_KEYS = ("optimizer", "lr", "model", "vocab_size", "seq_len", "batch_size", "micro_batch", "steps",
                  "eval_every", "eval_seqs", "warmup_frac", "min_lr_ratio", "clip", "rank", "proj_gap", "seed")


_OPTIONAL_IDENTITY_KEYS = ("aux_lr", "batch_schedule", "max_batch_size", "batch_eta", "nproc", "parallel")  # when set


def _identity(job: dict) -> dict:
    ident = {k: job[k] for k in _IDENTITY_KEYS}
    ident.update({k: job[k] for k in _OPTIONAL_IDENTITY_KEYS if job.get(k) is not None})
    return ident


def log_to_file(job: dict, name: str) -> None:
    """Send this process' logging (and library warnings) to ``<job dir>/<name>``."""
    jobdir = Path(job["dir"])
    jobdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(jobdir / name, mode="a" if job.get("resume") else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings go to the log, not through the progress bars


def run_job(job: dict, progress: _Progress, group=None) -> str:
    """Train one job and (on rank 0) write ``result.json`` and ``curve.csv`` unless it stopped
    early; a failure becomes a ``failed`` result. Returns the status."""
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


def worker_main(job: dict, q=None) -> None:
    """Entry point of a worker process: trains one job and writes ``result.json`` (unless stopped early);
    a distributed job (``nproc`` > 1) runs under torchrun (:func:`snsm.bench.launch.run_distributed`)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    progress = _Progress(q, job["name"])
    try:
        if job.get("nproc", 1) > 1:
            from .launch import run_distributed
            status = run_distributed(job, progress)
        else:
            log_to_file(job, "worker.log")
            status = run_job(job, progress)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return
    progress.send("done", status)


def run_jobs(jobs: list[dict], workers: int, show_progress: bool = True) -> dict[str, dict]:
    """Run ``jobs`` in up to ``workers`` concurrent spawned processes; returns each job's result.

    With ``resume`` set, a job that already finished (its ``result.json`` says ``done``) is not
    run again; any other job continues from its checkpoint if it has one.
    """
    import multiprocessing as mp

    results: dict[str, dict] = {}
    pending = []
    for job in jobs:
        rpath = Path(job["dir"]) / "result.json"
        done = json.loads(rpath.read_text()) if job.get("resume") and rpath.exists() else None
        if done is not None and done.get("status") == "done":
            results[job["name"]] = done
            log.info("%s: already finished, reusing %s", job["name"], rpath)
        else:  # not run yet, interrupted, failed or skipped: (re)run it
            pending.append(job)
    if not pending:
        return results

    saved_env = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # inherited by the spawned workers
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    bars = _Bars([j["name"] for j in pending], {j["name"]: j["steps"] for j in pending}, show_progress)
    running: dict[str, tuple[Any, dict]] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                p = ctx.Process(target=worker_main, args=(job, q), name=f"snsm-bench-{job['name']}")
                p.start()
                running[job["name"]] = (p, job)
            try:
                while True:
                    bars.handle(q.get(timeout=0.2))
            except queue_mod.Empty:
                pass
            for name, (p, job) in list(running.items()):
                if p.is_alive():
                    continue
                p.join()
                del running[name]
                rpath = Path(job["dir"]) / "result.json"
                if rpath.exists():
                    results[name] = json.loads(rpath.read_text())
                elif job.get("stop_after"):
                    results[name] = {"name": name, "status": "stopped"}
                else:
                    results[name] = {"name": name, "optimizer": job["optimizer"], "lr": job["lr"],
                                     "status": "failed", "skipped": True,
                                     "reason": f"worker exited with code {p.exitcode}"}
                bars.finish(name)
    except BaseException:
        for p, _ in running.values():
            p.terminate()
        for p, _ in running.values():
            p.join(5)
        raise
    finally:
        bars.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


class _Bars:
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
