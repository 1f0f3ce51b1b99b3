"""Launching the jobs: one worker process per job, and distributed jobs under torchrun.

:func:`run_jobs` (the parent) runs each job (one optimizer at one learning
rate) in a fresh ``spawn``-ed process (:func:`worker_main`) with one intra-op
thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``): on a small CPU
machine, two single-threaded processes are about 3x faster in total than two
2-thread ones, whose threads spin-wait against each other. A fresh process
also makes its ``ru_maxrss`` a clean peak-memory measurement. The worker trains
the job with :func:`snsm.bench.train.run_job` and reports its progress to the
parent's bars (:mod:`snsm.bench.progress`).

Distributed jobs (``python -m snsm.bench --nproc N --parallel ddp|fsdp``):
with ``--nproc N`` the job's worker
writes the job to ``<job dir>/job.json`` and runs
``python -m torch.distributed.run --standalone --nproc_per_node=N -m snsm.bench.launch <job.json>``
(gloo on CPU, nccl with one GPU per process on CUDA). Every rank builds the
same model from ``init_model.pt`` and wraps it:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; the optimizer sees
  plain, replicated parameters;
* ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer
  block and then on the root (embedding, final norm, output head); the
  optimizer steps row-sharded DTensors.

Each rank trains on its ``batch_size / N`` sequences of every global batch
(:class:`~snsm.bench.textdata.Batches` slices by rank), so the global batch,
the token budget and the gradients are those of the one-process run. Every
rank evaluates its share of the validation sequences (with FSDP every rank
must run every forward pass, so a rank whose share has run out runs a
zero-weight one) and the sums are all-reduced: the same mean loss as one
process. Rank 0 reports progress (JSON lines on stdout, relayed to the
progress bar by the worker), logs to ``worker.log`` (other ranks to
``worker-rank<k>.log``; torchrun's own output goes to ``torchrun.log``) and
writes ``result.json``, ``curve.csv`` and the checkpoint: ``checkpoint.pt`` in
the one-process format under DDP (rank 0's replica), and under FSDP a
``torch.distributed.checkpoint`` directory ``dcp-step<k>`` (model and
optimizer from ``get_state_dict``, each rank writing its shards) that
``checkpoint.pt`` names, written only after the directory is complete
(:mod:`snsm.bench.checkpoint`).

Workers die with their parent: a worker asks the kernel for SIGTERM when its parent dies
(Linux ``prctl(PR_SET_PDEATHSIG)``), checks that its parent is still the scheduler (closing the race
with a parent that died first), and watches the parent's pid from a thread as the portable fallback.
A worker's SIGTERM handler exits at once (a job's atomic writers remove their temporaries; a
distributed job's worker stops torchrun, which the same death signal also covers). The parent sent
SIGTERM (:class:`snsm.bench.Terminated`, raised by the command line's handler) forwards it to its
workers and waits for them before it exits. So a ``--resume`` started right after a killed run never
races the old run's workers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .fileio import atomic_write_text, log_to_file
from .progress import Bars, Progress, StdoutProgress, parse_line
from .train import run_job

log = logging.getLogger(__name__)

PARALLEL_MODES = ("ddp", "fsdp")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE_S = 45.0  # how long a stopped worker may take (a distributed one waits up to 30 s for torchrun)


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent (the thread that started
    it) dies. Returns whether it was set (False elsewhere)."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def parent_death_preexec(sig: int):
    """A ``subprocess.Popen(preexec_fn=...)`` that sets the child's parent-death signal to ``sig``
    (Linux; None elsewhere). The C function is looked up here, before the fork."""
    prctl, sig = _prctl(), int(sig)
    if prctl is None:
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def exit_with_parent(parent: int, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S, poll: float = 0.5) -> None:
    """End this process when process ``parent`` (its parent now) dies, even by SIGKILL: the kernel's
    death signal ``sig`` where there is one (Linux), and everywhere a daemon thread that polls
    ``os.getppid()`` (a dead parent's children are re-parented) and then sends ``sig`` to this
    process, and ends it ``grace`` seconds later if it is still there. A parent that died before the
    death signal was set is caught by the thread's first check."""
    set_parent_death_signal(sig)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        log.warning("parent process %d is gone; stopping", parent)
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), sig)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="snsm-bench-parent-watch", daemon=True).start()


def worker_main(job: dict, q=None, parent: int | None = None) -> None:
    """Entry point of a worker process: trains one job and writes ``result.json`` (unless stopped early);
    a distributed job (``nproc`` > 1) runs under torchrun (:func:`run_distributed`). See :func:`serve`."""
    serve(job, q, parent, _pretraining)


def _pretraining(job: dict, progress) -> str:
    if job.get("nproc", 1) > 1:
        return run_distributed(job, progress)
    log_to_file(job, "worker.log")
    return run_job(job, progress)


def serve(job: dict, q, parent: int | None, run: Callable[[dict, Any], str]) -> None:
    """The body of a worker process: ``run(job, progress)`` reports its status on the queue ``q``.

    ``parent``: the scheduler's pid; the worker ends when that process does (:func:`exit_with_parent`).
    SIGTERM ends the worker at once through ``SystemExit(143)``, so that its writers clean up."""
    def on_sigterm(*_):
        if q is not None:
            q.cancel_join_thread()  # a parent that no longer reads the queue must not hold up the exit
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    if parent is not None:
        exit_with_parent(parent)
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    progress = Progress(q, job["name"])
    try:
        status = run(job, progress)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return
    except Exception as e:  # the job records its own failures: this is its result not written (a full disk)
        first = str(e).splitlines()[0] if str(e) else ""
        progress.send("done", "failed", f"failed: {type(e).__name__}: {first}")
        sys.exit(1)
    progress.send("done", status)


def stop_workers(procs: list, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the worker processes ``procs``, wait up to ``grace`` seconds for them, then SIGKILL the rest."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("%s did not stop within %.0f s; killing it", p.name, grace)
            p.kill()
            p.join()


def _failed_pretraining(job: dict, reason: str) -> dict:
    return {"name": job["name"], "optimizer": job["optimizer"], "lr": job["lr"], "status": "failed", "skipped": True,
            "reason": reason}


def run_jobs(jobs: list[dict], workers: int, show_progress: bool = True, *,
             target: Callable[..., None] | None = None, steps_key: str = "steps",
             failed: Callable[[dict, str], dict] = _failed_pretraining) -> dict[str, dict]:
    """Run ``jobs`` in up to ``workers`` concurrent spawned processes; returns each job's result.

    Each process runs ``target(job, queue, parent_pid)`` (default :func:`worker_main`, a pretraining
    job), which writes ``<job dir>/result.json`` and reports progress (``job[steps_key]`` steps) on the
    queue; a job that ends without a result gets ``failed(job, reason)``. With ``resume`` set, a job
    that already finished (its ``result.json`` says ``done``) is not run again; any other job continues
    from its checkpoint if it has one.
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
    target = worker_main if target is None else target
    bars = Bars([j["name"] for j in pending], {j["name"]: j[steps_key] for j in pending}, show_progress)
    running: dict[str, tuple[Any, dict]] = {}
    reasons: dict[str, str] = {}  # why a worker that could not write its result.json failed

    def handle(msg) -> None:
        if msg[0] == "done" and len(msg) > 3:
            reasons[msg[1]] = msg[3]
        bars.handle(msg)

    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                p = ctx.Process(target=target, args=(job, q, os.getpid()), name=f"snsm-bench-{job['name']}")
                p.start()
                running[job["name"]] = (p, job)
            try:
                handle(q.get(timeout=0.2))
                while True:
                    handle(q.get_nowait())
            except queue_mod.Empty:
                pass
            for name, (p, job) in list(running.items()):
                if p.is_alive():
                    continue
                p.join()
                del running[name]
                with contextlib.suppress(queue_mod.Empty):  # its last messages, sent before it exited
                    while True:
                        handle(q.get_nowait())
                rpath = Path(job["dir"]) / "result.json"
                if rpath.exists():
                    results[name] = json.loads(rpath.read_text())
                elif job.get("stop_after"):
                    results[name] = {"name": name, "status": "stopped"}
                else:
                    results[name] = failed(job, reasons.get(name, f"worker exited with code {p.exitcode}"))
                bars.finish(name)
    except BaseException:  # Ctrl-C, SIGTERM (snsm.bench.Terminated), an error: no worker outlives this
        stop_workers([p for p, _ in running.values()])
        raise
    finally:
        bars.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def torchrun_command(nproc: int, job_file: Path) -> list[str]:
    """The ``torch.distributed.run`` command line that runs one job as ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "snsm.bench.launch", str(job_file)]


def run_distributed(job: dict, progress) -> str:
    """Run ``job`` under torchrun from its worker process, relaying rank 0's progress messages.

    Rank 0 writes ``result.json``; if torchrun fails without one (a rank crashed or hung and was
    killed), this writes a ``failed`` result pointing at the logs. Returns the job's status."""
    jobdir = Path(job["dir"])
    jobdir.mkdir(parents=True, exist_ok=True)
    job_file = jobdir / "job.json"
    atomic_write_text(job_file, json.dumps(job, indent=1))
    rpath = jobdir / "result.json"
    rpath.unlink(missing_ok=True)  # a stale (failed) result of an earlier run must not stand for this one
    logfile = jobdir / "torchrun.log"
    # SIGTERM (the scheduler giving up, or its death) ends this process through SystemExit (worker_main's
    # handler), and the finally below takes torchrun and its ranks down; torchrun also gets SIGTERM
    # from the kernel should this process die without running it (Linux)
    with open(logfile, "a" if job.get("resume") else "w") as err:
        proc = subprocess.Popen(torchrun_command(job["nproc"], job_file), stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1, preexec_fn=parent_death_preexec(signal.SIGTERM))
        try:
            for line in proc.stdout:
                msg = parse_line(line)
                if msg is not None:
                    progress.send(*msg)
                else:
                    err.write(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if rpath.exists():
        return json.loads(rpath.read_text())["status"]
    if code == 0 and job.get("stop_after"):
        return "stopped"
    result = {"name": job["name"], "optimizer": job["optimizer"], "lr": job["lr"], "status": "failed",
              "skipped": True, "reason": f"failed: torchrun exited with code {code} (see {logfile} and "
                                         f"{jobdir / 'worker*.log'})"}
    atomic_write_text(rpath, json.dumps(result, indent=1))
    return "failed"


class Group:
    """This process' place in a distributed job: rank, world size, device, the wrapping, and the
    few collectives the benchmark needs (initialises the default process group)."""

    def __init__(self, parallel: str, device: str):
        import torch
        import torch.distributed as dist

        if parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {parallel!r}")
        self.parallel = parallel
        if device.startswith("cuda"):
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            self.backend = "nccl"
            dist.init_process_group(self.backend, device_id=self.device)
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
            dist.init_process_group(self.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def wrap(self, model):
        """``(wrapped, inner)``: the module to train through and the one the optimizer and the
        checkpoints see (DDP: its ``.module``; FSDP2: the same, sharded in place)."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids), model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        """Mean of ``value`` over the ranks."""
        return self.sum([value])[0] / self.world

    def close(self) -> None:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank under torchrun: ``python -m snsm.bench.launch JOB_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    # end this rank if torchrun dies (killed with SIGKILL it cannot take its ranks along: torchrun starts
    # each in its own session, so a signal to the benchmark's process group misses them)
    exit_with_parent(os.getppid(), signal.SIGKILL)
    group = Group(job["parallel"], job["device"])
    log_to_file(job, "worker.log" if group.rank == 0 else f"worker-rank{group.rank}.log")
    progress = StdoutProgress() if group.rank == 0 else Progress(None, job["name"])
    code = 1
    try:
        status = run_job(job, progress, group)
        code = 1 if status == "failed" else 0  # a failed rank exits non-zero: torchrun then stops the rest
        if code == 0:
            group.close()
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    # skip interpreter teardown, where gloo's threads have been seen to abort
    os._exit(code)


if __name__ == "__main__":
    main()
