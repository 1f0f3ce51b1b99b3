"""Training one job (one optimizer at one learning rate) in this process: :func:`run_job`.

The scheduler that gives every job its own fresh, single-threaded worker process (and runs a
distributed job under torchrun) is :mod:`snsm.bench.launch`, above this module. Every job loads the
same initial weights (``init_model.pt``) and reads the same token stream
(:class:`~snsm.bench.textdata.Batches`).

Recipe (the paper's): cosine schedule with linear warm-up over the first 10%
of steps, decaying to 10% of the peak lr; gradient clipping at 1.0; weight
decay 0. Validation loss is evaluated at step 0, every ``eval_every`` steps and
at the end, on the same validation sequences for every job.

How a step clips and steps (:class:`Stepping`; ``--clip``, ``--max-norm``,
``--in-backward``): the clip is ``global`` (the recipe's
``clip_grad_norm_(max_norm)`` before ``opt.step()``), ``tensor`` (each
gradient to norm ``max_norm`` on its own), ``previous`` (every gradient scaled
by the previous step's global clip factor, the first step unclipped) or
``none``; the last three are the definitions of :mod:`snsm.in_backward` and
also apply to ordinary steps. With ``in_backward`` every parameter steps
inside backward: an snsm optimizer through ``opt.step_in_backward(clip=...,
max_norm=...)`` (the DDP / FSDP2 module passed in a distributed job),
``torch.optim.AdamW`` through one fused AdamW per parameter driven by the same
handle (:class:`PerParameterSteps`, torch's post-accumulate-grad pattern);
gradient accumulation wraps every micro-batch but the last in
``accumulating()``; an optimizer that cannot step in backward (a peer,
``snsm.MetaSTORM``) is reported as skipped. ``opt.step()`` and ``zero_grad()``
still run after backward (no-ops then), so the loop keeps its shape; the
optimizer's own time cannot be separated from backward there, so
``optimizer_step_time_s`` is ``None``. Every combination resumes
bit-identically (in backward, the ``previous`` clip's factor is saved from the
handle's ``state_dict()`` with the run).

Optimizers that need a closure (``snsm.MetaSTORM``: an optimizer with a true
``needs_closure`` attribute, or a MetaSTORM instance) step as
``opt.step(closure)``; the closure zeroes the gradients, runs the micro-batches'
forward and backward on the step's batch at the current parameters and clips
(with ``previous``, the factor comes from the first evaluation of each step).
The job counts gradient evaluations (closure calls; 1 per step otherwise):
``grad_evals`` and ``grad_evals_per_step`` in the result, so that runs can be
compared at equal gradient evaluations. ``optimizer_step_time_s`` of such a
step is ``opt.step(closure)`` minus the time inside the closure.

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
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import checkpoint
from .fileio import atomic_write_text

log = logging.getLogger(__name__)


def lr_schedule(opt, name: str, factor: Callable[[int], float]):
    """The job's LR scheduler: every group's lr times ``factor(step)``, except the groups the entry
    holds at a constant lr (``OptimizerSpec.constant_lr``: AdaGO's orthogonalized groups), which keep
    their peak. Per group in the scheduler itself, so it holds inside backward too (where no
    ``opt.step()`` hook runs before the parameters step)."""
    import torch

    from .optimizers import REGISTRY
    held = REGISTRY[name].constant_lr
    if held is None:
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, [(lambda _: 1.0) if held(g) else factor for g in opt.param_groups])


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


CLIP_MODES = ("global", "tensor", "previous", "none")
CLIP_EPS = 1e-6  # the clip factor is max_norm / (norm + CLIP_EPS), as snsm.in_backward's


def needs_closure(opt) -> bool:
    """Whether ``opt`` steps as ``opt.step(closure)``: a ``needs_closure`` attribute if it has one
    (a registry entry may set it), else whether it is a :class:`snsm.MetaSTORM`."""
    flag = getattr(opt, "needs_closure", None)
    if flag is not None:
        return bool(flag)
    import snsm
    return isinstance(opt, snsm.MetaSTORM)


class PerParameterSteps:
    """Torch's optimizer-step-in-backward pattern for a ``torch.optim`` optimizer (AdamW): one copy
    of it per parameter (its group's options, ``fused=True``), stepped when that parameter's
    gradient is final, through the same :class:`snsm.in_backward.InBackward` handle (and so the
    same clipping) as the snsm optimizers.

    ``opt`` stays the optimizer the job sees: its ``param_groups`` (the LR scheduler's), its
    ``state`` (the copies step on it) and its ``state_dict``; its groups are set to ``fused=True``
    so that a loaded state puts ``step`` where the fused copies need it. ``opt.step()`` after
    backward finds no gradient and does nothing.
    """

    def __init__(self, opt):
        self.opt = opt
        self.accumulating_now = False
        self.handle = None
        self.copies: dict = {}
        import inspect
        takes = set(inspect.signature(type(opt)).parameters) - {"params"}
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, None
            options = {k: v for k, v in group.items() if k in takes}
            for p in group["params"]:
                self.copies[p] = (type(opt)([p], **options), group)

    def start(self, model=None, clip: str | None = None, max_norm: float = 1.0):
        """Hook every parameter (``model``: the DDP / FSDP2 module, as ``step_in_backward``'s); returns the handle."""
        from snsm.in_backward import InBackward
        self.handle = InBackward(self, model, clip, max_norm)
        return self.handle

    # what InBackward asks of the optimizer it drives
    def parameters(self):
        return iter(self.copies)

    def owns(self, p) -> bool:
        return p in self.copies

    def step_parameter(self, p, grad) -> None:
        copy, group = self.copies[p]
        own = copy.param_groups[0]
        own["lr"] = group["lr"]  # the scheduler drives the job's optimizer
        copy.state = self.opt.state  # (rebound: load_state_dict replaces the dict)
        p.grad = grad
        copy.step()
        p.grad = None

    def forget_in_backward(self, handle) -> None:
        self.handle = None

    @contextmanager
    def accumulating(self):
        previous = self.accumulating_now
        self.accumulating_now = True
        try:
            with (self.handle.no_sync() if self.handle is not None else nullcontext()):
                yield
        finally:
            self.accumulating_now = previous


class Stepping:
    """How a job's training step gets from the gradients to the parameters: the clip mode
    (``global`` / ``tensor`` / ``previous`` / ``none``, at ``max_norm``), whether the parameters
    step inside backward, and whether the optimizer needs a closure. Keeps the ordinary
    ``previous`` clip's factor (``factor``, a float, part of the run's checkpoint)."""

    def __init__(self, clip: str = "global", max_norm: float = 1.0, in_backward: bool = False):
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")
        if in_backward and clip == "global":
            raise ValueError("a global-norm clip cannot run inside backward; use tensor, previous or none")
        self.clip, self.max_norm, self.in_backward = clip, float(max_norm), in_backward
        self.factor: float | None = None  # ordinary steps, clip "previous": the previous step's factor
        self.closure = False
        self.handle = None
        self.per_parameter = False  # torch.optim.AdamW through PerParameterSteps
        self._accumulate = nullcontext

    def start(self, opt, model=None, name: str = "") -> None:
        """Set up ``opt`` (built, its state loaded): decide the closure path, and hook the parameters
        when stepping in backward (``model``: the DDP / FSDP2 module of a distributed job, else None).
        Raises :class:`~snsm.bench.optimizers.PeerUnavailable` (the job is skipped) for an optimizer
        that cannot step in backward."""
        import torch

        from .optimizers import PeerUnavailable
        self.closure = needs_closure(opt)
        if not self.in_backward:
            return
        clip = None if self.clip == "none" else self.clip
        why = None
        if self.closure:
            why = "it evaluates a closure twice per step"
        elif hasattr(opt, "step_in_backward"):
            self.handle = opt.step_in_backward(model, clip=clip, max_norm=self.max_norm)
            self._accumulate = opt.accumulating
        elif type(opt) is torch.optim.AdamW:
            steps = PerParameterSteps(opt)
            self.handle = steps.start(model, clip, self.max_norm)
            self._accumulate, self.per_parameter = steps.accumulating, True
        else:
            why = (f"{type(opt).__name__}: the benchmark steps the snsm optimizers and torch.optim.AdamW inside "
                   "backward")
        if why:
            raise PeerUnavailable(f"{name or type(opt).__name__} cannot step inside backward ({why})")

    def end_backward(self, opt) -> None:
        """After the step's last backward, in backward: close the step (``previous`` takes its norm
        now) and drop what DDP wrote back into ``.grad`` of the per-parameter copies' parameters
        (they stepped; ``opt.step()`` would step them again)."""
        if self.handle is None:
            return
        self.handle.end_step()
        if self.per_parameter:
            opt.zero_grad(set_to_none=True)

    def accumulating(self):
        """The context of a micro-batch that only accumulates (in backward: no step, no free)."""
        return self._accumulate() if self.in_backward else nullcontext()

    def clip_grads(self, params, record: bool = True) -> None:
        """Clip the gradients of an ordinary step (``record``: this evaluation's norm sets the next
        step's ``previous`` factor)."""
        import torch

        if self.in_backward or self.clip == "none":
            return
        params = [p for p in params if p.grad is not None]
        if self.clip == "global":
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
            return
        if self.clip == "tensor":
            for p in params:
                norm = p.grad.float().norm()
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                p.grad = p.grad * (self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0).to(p.grad.dtype)
            return
        factor = self.factor
        if record:
            total = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(total, "full_tensor"):
                total = total.full_tensor()
            self.factor = float((self.max_norm / (total.float() + CLIP_EPS)).clamp(max=1.0))
        if factor is not None:
            f = torch.tensor(factor, dtype=torch.float32)
            for p in params:
                p.grad = p.grad * f.to(device=p.grad.device, dtype=p.grad.dtype)


def _backward(model, block, micro: int, device, autocast_dtype, stepping, observe=None, tracker=None) -> float:
    """Forward and backward of ``block`` in micro-batches of ``micro`` sequences (the loss of each
    scaled by its share); every micro-batch but the last inside ``stepping.accumulating()``."""
    import torch
    from .model import lm_loss

    n = block.size(0)
    total = 0.0
    for i in range(0, n, micro):
        if tracker is not None and i:
            tracker.reset_mod_stats()
        with stepping.accumulating() if i + micro < n else nullcontext():
            x = block[i:i + micro].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = lm_loss(model, x) * (x.size(0) / n)
            loss.backward()
        if observe is not None:
            observe(x.size(0))
        total += float(loss.detach())
    return total


def train_step(model, opt, block, micro_batch: int | None, clip, device, autocast_dtype=None,
               observe=None, tracker=None) -> tuple[float, float, float, int]:
    """One optimizer step on ``block`` (batch, seq_len + 1), in micro-batches.

    ``clip``: a :class:`Stepping` (how to clip and step), or a number: the global clip's max norm
    (ordinary steps). Returns ``(loss, opt_cpu, opt_wall, grad_evals)``: the mean loss, the process
    CPU time and the wall time of ``opt.step()`` alone (on CUDA between two ``torch.cuda.synchronize``,
    so that neither the pending backward nor the step's own kernels are misplaced; for a closure
    optimizer without the time inside the closure), and the gradient evaluations of the step
    (closure calls; else 1).

    ``observe(samples)``, if given, is called after each micro-batch's ``backward()`` (before
    clipping): the adaptive batch-size controller reads the accumulating gradients there.
    ``tracker``: the active ``MemTracker``, whose per-module statistics are reset between
    micro-batches (it refuses a second forward of the same module otherwise; its global peak stays)."""
    import torch

    stepping = clip if isinstance(clip, Stepping) else Stepping("global", clip)
    micro = micro_batch or block.size(0)
    cuda = device.type == "cuda"
    inside = {"cpu": 0.0, "wall": 0.0, "evals": 0}
    if stepping.closure:
        def closure():
            c, w = time.process_time(), time.perf_counter()
            first = inside["evals"] == 0
            if tracker is not None and not first:
                tracker.reset_mod_stats()  # the same modules' forward again
            opt.zero_grad(set_to_none=True)
            loss = _backward(model, block, micro, device, autocast_dtype, stepping,
                             observe if first else None, tracker)
            stepping.clip_grads(model.parameters(), record=first)
            if cuda:
                torch.cuda.synchronize(device)
            inside["evals"] += 1
            inside["cpu"] += time.process_time() - c
            inside["wall"] += time.perf_counter() - w
            return loss

        c0, w0 = time.process_time(), time.perf_counter()
        total = float(opt.step(closure))
        opt_cpu = time.process_time() - c0 - inside["cpu"]
        opt_wall = time.perf_counter() - w0 - inside["wall"]
        opt.zero_grad(set_to_none=True)
        return total, max(opt_cpu, 0.0), max(opt_wall, 0.0), inside["evals"]
    total = _backward(model, block, micro, device, autocast_dtype, stepping, observe, tracker)
    stepping.clip_grads(model.parameters())
    stepping.end_backward(opt)
    if cuda:
        torch.cuda.synchronize(device)
    c0, w0 = time.process_time(), time.perf_counter()
    opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    opt_cpu, opt_wall = time.process_time() - c0, time.perf_counter() - w0
    opt.zero_grad(set_to_none=True)
    return total, opt_cpu, opt_wall, 1


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


def job_stepping(job: dict) -> Stepping:
    """The job's :class:`Stepping`: ``clip_mode`` (default ``global``), ``clip`` (the max norm) and
    ``in_backward`` (default False)."""
    return Stepping(job.get("clip_mode") or "global", job["clip"], bool(job.get("in_backward")))


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
           "peak_tensor_bytes": None, "peak_rss_delta_bytes": 0, "peak_cuda_bytes": None, "diverged": False,
           "grad_evals": 0, "clip_factor": None}
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
        sched = lr_schedule(opt, job["optimizer"], lambda _: factor(run["tokens"] / tokens_per_step))
    else:
        sched = lr_schedule(opt, job["optimizer"], factor)

    def tokens_now() -> int:
        return run["tokens"] if adaptive else run["step"] * tokens_per_step

    def finished() -> bool:
        return run["tokens"] >= train_tokens if adaptive else run["step"] >= steps
    ckpt_path = jobdir / "checkpoint.pt"
    if job.get("resume") and ckpt_path.exists():
        checkpoint.restore(ckpt_path, job, inner, opt, sched, run, device, ctl)
        log.info("resumed %s at step %d", job["name"], run["step"])
    stepping = job_stepping(job)
    stepping.factor = run["clip_factor"]
    stepping.start(opt, model if group is not None else None, job["optimizer"])
    if stepping.handle is not None:  # in backward: the handle keeps the "previous" clip's factor
        stepping.handle.load_state_dict({"factor": run["clip_factor"]})

    def save_checkpoint() -> None:
        run["clip_factor"] = stepping.handle.state_dict()["factor"] if stepping.handle is not None else stepping.factor
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
            with tracker, warnings.catch_warnings():
                # MemTracker meets the gradients that steps inside backward have already freed
                warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass", UserWarning)
                loss, opt_cpu, opt_wall, evals = train_step(model, opt, block, job["micro_batch"], stepping,
                                                            device, amp, observe, tracker)
            peak = _memtracker_peak(tracker)
            run["peak_tensor_bytes"] = max(run["peak_tensor_bytes"] or 0, peak or 0) or None
        else:
            loss, opt_cpu, opt_wall, evals = train_step(model, opt, block, job["micro_batch"], stepping, device,
                                                        amp, observe)
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
        run["grad_evals"] += evals
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
    if stepping.in_backward:
        opt_per_step = opt_per_wall = None  # inside backward: not separable from it
    extra = {"batch_schedule": "adaptive" if adaptive else "fixed", "clip_mode": stepping.clip,
             "max_norm": stepping.max_norm, "in_backward": stepping.in_backward, "needs_closure": stepping.closure,
             "grad_evals": run["grad_evals"],
             "grad_evals_per_step": run["grad_evals"] / run["step"] if run["step"] else None}
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


def _stats(xs: list[float]) -> dict:
    import statistics
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs), "n": len(xs)}


def time_step_modes(job: dict, steps: int, warmup: int = 2) -> dict:
    """The cost of stepping in backward: ``job``'s optimizer trains two copies of the model from the
    same initial weights on the same batches, one with ordinary steps and one inside backward, with
    the same clip (``job["clip_mode"]``, not ``global``), one training step each per round for
    ``warmup + steps`` rounds, in alternating order (ordinary first in even rounds, in backward
    first in odd ones) so that drift and order effects cancel; the first ``warmup`` rounds are not
    timed. A step is timed as in :func:`_train` (process CPU time and wall time of ``train_step``,
    CUDA synchronized). Returns both modes' statistics, the ratios (in backward / ordinary: of the
    means, of the medians, and the median of each round's ratio), and the largest parameter
    difference at the end (0.0 with ``clip_mode`` ``none``: the library's steps in backward are
    bit-identical)."""
    import torch

    from .model import build_model, model_size
    from .optimizers import REGISTRY, BuildContext
    from .textdata import Batches

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    batches = Batches(_load_tokens(job["train_tokens"]), job["seq_len"], job["batch_size"], job["seed"])
    size = model_size(job["model"])
    ctx = BuildContext(rank=job["rank"], proj_gap=job["proj_gap"], hidden=size.hidden, heads=size.heads,
                       seed=job["seed"], aux_lr=job.get("aux_lr"))
    factor = cosine_with_warmup(warmup + steps, job["warmup_frac"], job["min_lr_ratio"])
    modes = {}
    for mode in ("ordinary", "in_backward"):
        model = build_model(job["model"], job["vocab_size"], job["seq_len"], job["seed"])
        model.load_state_dict(torch.load(job["init_path"], weights_only=True))
        model.to(device)
        opt = REGISTRY[job["optimizer"]].build(model, job["lr"], ctx)
        sched = lr_schedule(opt, job["optimizer"], factor)
        stepping = Stepping(job["clip_mode"], job["clip"], mode == "in_backward")
        stepping.start(opt, None, job["optimizer"])
        modes[mode] = {"model": model, "opt": opt, "sched": sched, "stepping": stepping, "cpu": [], "wall": [],
                       "loss": None}
    for r in range(warmup + steps):
        block = batches.batch(r)
        order = ("ordinary", "in_backward") if r % 2 == 0 else ("in_backward", "ordinary")
        for mode in order:
            m = modes[mode]
            if cuda:
                torch.cuda.synchronize(device)
            c0, w0 = time.process_time(), time.perf_counter()
            m["loss"], *_ = train_step(m["model"], m["opt"], block, job["micro_batch"], m["stepping"], device, amp)
            if cuda:
                torch.cuda.synchronize(device)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            m["sched"].step()
            if r >= warmup:
                m["cpu"].append(cpu)
                m["wall"].append(wall)
    a, b = modes["ordinary"], modes["in_backward"]
    with torch.no_grad():
        diff = max(float((p - q).abs().max()) for p, q in zip(a["model"].parameters(), b["model"].parameters()))
    import statistics
    out = {"optimizer": job["optimizer"], "lr": job["lr"], "clip_mode": job["clip_mode"], "max_norm": job["clip"],
           "steps_timed": steps, "warmup_rounds": warmup, "threads": job["threads"], "device": job["device"],
           "max_param_diff": diff, "final_train_loss": {"ordinary": a["loss"], "in_backward": b["loss"]}}
    for kind in ("wall", "cpu"):
        sa, sb = _stats(a[kind]), _stats(b[kind])
        out[f"{kind}_s"] = {"ordinary": sa, "in_backward": sb}
        out[f"{kind}_ratio"] = {"of_means": sb["mean"] / sa["mean"], "of_medians": sb["median"] / sa["median"],
                                "median_of_rounds": statistics.median(y / x for x, y in zip(a[kind], b[kind]))}
    return out


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
