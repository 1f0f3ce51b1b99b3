"""Command line: ``python -m snsm.bench`` / ``snsm-bench``.

Examples::

    python -m snsm.bench                          # default preset, all optimizers, ~20 min on 2 cores
    python -m snsm.bench --preset smoke --out /tmp/smoke
    python -m snsm.bench --optimizers adamw,adamw-snsm --steps 200
    python -m snsm.bench --out results/default --resume       # continue a killed run
    python -m snsm.bench --sweep lr --optimizers adamw,adamw-sn   # learning-rate sweep
    python -m snsm.bench --data-files my_texts/ --preset default
    python -m snsm.bench --preset paper-60m --device cuda          # GPU; streams allenai/c4
    python -m snsm.bench --preset family                # AdaGrad-Norm, AdaGO, Muon, adaptive batches
    python -m snsm.bench --optimizers adagrad-sn --batch-schedule adaptive --max-batch-size 32
    python -m snsm.bench --preset smoke --nproc 2 --parallel fsdp   # each job as 2 torchrun processes
    python -m snsm.bench --preset smoke --in-backward --clip previous  # every step inside backward
    python -m snsm.bench --optimizers adamw-snsm,adamw-sn --clip none --time-in-backward 40  # its time cost
    python -m snsm.bench --task finetune                # fine-tuning benchmark (= --preset finetune), ~15 min

Bad input, and an output directory that cannot be written (a file, no permission, a full disk:
``cannot write to PATH: REASON``), exit with a one-line error (status 2) and no traceback. A job
that fails (a corrupt checkpoint, a crash) is reported on one line of its own and the run exits with
status 1 once its summary is written; a peer optimizer that is not installed is skipped, not failed.
SIGTERM stops the workers, waits for them and exits with status 143; stale temporary files of killed
processes are removed from ``--out`` when a run starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from . import BenchError, Terminated
from .fileio import atomic_torch_save, atomic_write_text, ensure_writable_dir, sweep_temporaries

log = logging.getLogger("snsm.bench")


MAX_BATCH_FACTOR = 4  # default --max-batch-size: 4 x --batch-size
DEFAULT_BATCH_ETA = 0.75  # grows the benchmark's batch gradually (0.25 reached the cap at step 1; docs/family.md)
ADAPTIVE_MICRO_STEPS = 4  # default micro-batches per step at the starting batch (adaptive jobs)


def adaptive_micro_batch(batch_size: int, micro_batch: int | None) -> int:
    """The micro-batch (the controller's granularity) of an adaptive job: ``--micro-batch`` if given,
    else ``batch_size / 4`` (or ``/ 2``): the variance estimate needs >= 2 micro-batches per step."""
    if micro_batch:
        return micro_batch
    for k in (ADAPTIVE_MICRO_STEPS, 2):
        if batch_size % k == 0:
            return batch_size // k
    return batch_size


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS
    p = _Parser(prog="snsm-bench", description="Pretraining benchmark: snsm optimizers vs AdamW and peers.")
    p.add_argument("--task", choices=TASKS,
                   help="pretrain (the default with every preset but finetune) or finetune (the fine-tuning "
                        "benchmark, snsm.bench.finetune: its preset is finetune, the default with --task finetune)")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: default; finetune with --task finetune)")
    p.add_argument("--optimizers", help="comma-separated subset (default: the preset's list)")
    p.add_argument("--out", help="output directory (default: results/<preset>[-sweep-lr])")
    p.add_argument("--resume", action="store_true", help="continue a run in --out from its checkpoints")
    p.add_argument("--dataset", help="Hugging Face dataset NAME[:CONFIG], streamed (needs the network)")
    p.add_argument("--data-files", nargs="+", metavar="PATH", help="local .txt/.jsonl/.parquet files or folders")
    p.add_argument("--sweep", choices=["lr"], help="sweep the learning rate of each optimizer")
    p.add_argument("--sweep-factors", default="0.3,1,3",
                   help="multipliers of the configured lr to try with --sweep lr (default: 0.3,1,3)")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR", help="override one optimizer's lr")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (default 0)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per job, data parallel through torchrun (gloo on CPU, nccl and one GPU per "
                        "process on CUDA); each takes an equal share of every batch, so the global batch and the "
                        "token budget stay the preset's; needs --parallel (default 1)")
    from .launch import PARALLEL_MODES
    p.add_argument("--parallel", choices=PARALLEL_MODES,
                   help="with --nproc N > 1: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard per "
                        "transformer block and root; checkpoints through torch.distributed.checkpoint)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--workers", type=int,
                   help="concurrent jobs (default: CPU cores / --nproc, at least 1; 1 on GPU); a distributed job "
                        "counts once and runs --nproc processes, so by default distributed jobs on a machine with "
                        "no more cores than --nproc run one at a time")
    p.add_argument("--cache-dir", help="tokenizer/token cache (default: $SNSM_BENCH_CACHE or .cache/snsm-bench)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--model", help="llama_9m, llama_20m, ..., llama_1b")
    g.add_argument("--steps", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    g.add_argument("--micro-batch", type=int,
                   help="sequences per forward/backward (gradient accumulation; per process with --nproc)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations")
    g.add_argument("--eval-seqs", type=int, help="validation sequences per evaluation")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--rank", type=int, help="subspace rank (default hidden // 4)")
    g.add_argument("--proj-gap", type=int, help="steps between projector refreshes")
    b = p.add_argument_group("adaptive batch size (snsm.AdaptiveBatchSize, norm test)")
    b.add_argument("--batch-schedule", choices=["fixed", "adaptive"], default="fixed",
                   help="adaptive: every entry grows its batch (gradient-accumulation micro-steps) as the "
                        "controller says, up to --max-batch-size, within the same token budget (the '+adaptive' "
                        "entries always do); default fixed")
    b.add_argument("--max-batch-size", type=int,
                   help=f"cap on the adaptive batch, sequences (default {MAX_BATCH_FACTOR} x --batch-size)")
    b.add_argument("--batch-eta", type=float,
                   help=f"the norm test's eta: smaller grows the batch sooner (default {DEFAULT_BATCH_ETA})")
    from .train import CLIP_MODES
    s = p.add_argument_group("clipping and steps inside backward (snsm.in_backward)")
    s.add_argument("--clip", choices=CLIP_MODES,
                   help="global: clip_grad_norm_ to --max-norm before opt.step() (the paper's recipe, the default "
                        "with ordinary steps); tensor: each gradient to norm --max-norm on its own; previous: every "
                        "gradient scaled by the previous step's global clip factor (the first step unclipped); "
                        "none: no clipping. --in-backward needs tensor, previous or none")
    s.add_argument("--max-norm", type=float, help="the clip's max norm (default: the preset's, 1.0)")
    s.add_argument("--in-backward", action="store_true",
                   help="every parameter steps inside backward as soon as its gradient is final, and frees it "
                        "(snsm optimizers: opt.step_in_backward; adamw: one fused AdamW per parameter in "
                        "post-accumulate-grad hooks); optimizers that cannot are reported as skipped")
    s.add_argument("--time-in-backward", type=int, metavar="STEPS",
                   help="instead of the benchmark: time STEPS training steps of each optimizer with ordinary steps "
                        "and inside backward, alternating in one process (same data, same --clip, which must not "
                        "be global); prints ms per step and the ratio, writes timing.json")
    f = p.add_argument_group("fine-tuning (--task finetune)")
    f.add_argument("--base-steps", type=int, help="pretraining steps of the cached base model (default 500)")
    f.add_argument("--sweep-steps", type=int,
                   help="steps of each learning-rate sweep run, at --sweep-factors x each method's centre lr "
                        "(default 60; 0: no sweep)")
    f.add_argument("--adapter-rank", type=int, help="rank of the LoRA / DoRA / LoFT adapters (default 8)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop every job after N steps of this invocation, leaving a checkpoint (continue with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    return p


TASKS = ("pretrain", "finetune")


def resolve_task(args) -> str:
    """``--task`` and ``--preset`` agreed: sets ``args.preset`` and returns the task."""
    if args.task == "finetune" or (args.task is None and args.preset == "finetune"):
        if args.preset not in (None, "finetune"):
            raise BenchError(f"--task finetune runs the finetune preset, not --preset {args.preset}")
        args.preset = "finetune"
        return "finetune"
    if args.preset == "finetune":
        raise BenchError("--preset finetune is the fine-tuning benchmark: drop --task pretrain")
    args.preset = args.preset or "default"
    return "pretrain"


def resolve_preset(args):
    """The preset ``--preset`` names with the command line's overrides applied, checked."""
    from .model import model_size
    from .presets import get_preset

    preset = get_preset(args.preset or "default")
    over = {k: getattr(args, k) for k in ("model", "steps", "seq_len", "batch_size", "micro_batch", "eval_every",
                                          "eval_seqs", "ckpt_every", "vocab_size", "rank", "proj_gap")
            if getattr(args, k) is not None}
    for k, v in over.items():
        if k != "model" and v < 1:
            raise BenchError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    preset = dataclasses.replace(preset, **over)
    if getattr(args, "max_norm", None) is not None:
        preset = dataclasses.replace(preset, clip=args.max_norm)
    size = model_size(preset.model)
    if preset.rank is None:
        preset = dataclasses.replace(preset, rank=size.hidden // 4)
    if preset.steps < preset.eval_every:
        raise BenchError(f"budget too small to evaluate: {preset.steps} steps but evaluations every "
                         f"{preset.eval_every} steps (lower --eval-every or raise --steps)")
    if preset.steps < 2:
        raise BenchError(f"budget too small: {preset.steps} step(s); need at least 2")
    if preset.vocab_size < 300:
        raise BenchError(f"--vocab-size must be >= 300 (256 bytes + merges), got {preset.vocab_size}")
    if preset.micro_batch and preset.batch_size % preset.micro_batch:
        raise BenchError(f"--batch-size {preset.batch_size} is not a multiple of --micro-batch {preset.micro_batch}")
    return preset


def stepping_settings(args, preset, adaptive: bool) -> dict:
    """``{"clip_mode", "in_backward"}`` from ``--clip`` / ``--in-backward`` (checked; ``--max-norm``
    is the preset's ``clip``, see :func:`resolve_preset`)."""
    import math
    mode = args.clip or "global"
    timing = args.time_in_backward is not None
    if args.max_norm is not None and mode == "none":
        raise BenchError("--max-norm has no effect with --clip none")
    if timing and mode == "global":
        raise BenchError("--time-in-backward runs both modes with the same clip, and a global-norm clip cannot run "
                         "inside backward: add --clip tensor, --clip previous or --clip none")
    if args.in_backward and mode == "global":
        raise BenchError(f"--in-backward cannot clip by the global norm{'' if args.clip else ' (the default --clip)'}: "
                         "every gradient would be needed before the first step; use --clip tensor, --clip previous "
                         "or --clip none")
    if (args.in_backward or timing) and adaptive:
        raise BenchError("--in-backward: the adaptive batch size reads the gradients after every micro-batch, "
                         "which steps inside backward free; drop the '+adaptive' entries / --batch-schedule adaptive")
    if timing:
        if args.time_in_backward < 1:
            raise BenchError(f"--time-in-backward must be >= 1, got {args.time_in_backward}")
        for flag, bad in (("--in-backward", args.in_backward), ("--sweep", args.sweep), ("--resume", args.resume),
                          ("--nproc", args.nproc > 1), ("--stop-after", args.stop_after is not None)):
            if bad:
                raise BenchError(f"--time-in-backward runs alone: drop {flag}")
    if not math.isfinite(preset.clip) or preset.clip <= 0:
        raise BenchError(f"--max-norm must be > 0 and finite, got {preset.clip}")
    return {"clip_mode": mode, "in_backward": bool(args.in_backward)}


def _device(spec: str) -> str:
    import torch
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {spec}: CUDA is not available here")
        return spec
    if spec != "cpu":
        raise BenchError(f"unknown --device {spec!r}; use cpu, cuda, cuda:N or auto")
    return spec


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_parallel(args, preset, names, device: str, adaptive: bool) -> None:
    """One-line errors for ``--nproc`` / ``--parallel`` combinations that cannot run."""
    from .optimizers import REGISTRY
    if args.nproc < 1:
        raise BenchError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        if args.parallel:
            raise BenchError(f"--parallel {args.parallel} needs --nproc N with N >= 2")
        return
    if not args.parallel:
        raise BenchError(f"--nproc {args.nproc} needs --parallel ddp or --parallel fsdp")
    import torch.distributed as dist
    if not dist.is_available():
        raise BenchError("--nproc: this torch build has no torch.distributed")
    if device.startswith("cuda"):
        if device != "cuda":
            raise BenchError(f"--device {device} with --nproc {args.nproc}: use --device cuda (process k uses cuda:k)")
        import torch
        if torch.cuda.device_count() < args.nproc:
            raise BenchError(f"--nproc {args.nproc} needs {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    elif not dist.is_gloo_available():
        raise BenchError("--nproc on CPU needs the gloo backend, which this torch build lacks")
    if preset.batch_size % args.nproc:
        raise BenchError(f"--batch-size {preset.batch_size} is not divisible by --nproc {args.nproc} "
                         "(every process takes an equal share of each batch)")
    if adaptive:
        raise BenchError("the adaptive batch size ('+adaptive' entries, --batch-schedule adaptive) runs in one "
                         "process only; drop --nproc or those entries")
    for n in names:
        spec = REGISTRY[n]
        if args.parallel not in spec.parallel:
            raise BenchError(f"--parallel {args.parallel}: optimizer {n!r} does not run under it; "
                             f"it supports --parallel {' / '.join(spec.parallel)}")


def _lrs(args, names, table):
    from .optimizers import REGISTRY, learning_rate, parse_lr_overrides
    lrs = {n: learning_rate(n, table) for n in names}
    lrs.update(parse_lr_overrides(args.lr, lambda name: name in REGISTRY, "a known optimizer name"))
    return lrs


def _prepare_data(args, preset, cache_dir: Path, out: Path):
    """Documents -> tokenizer -> cached token arrays; returns their paths and facts for the summary."""
    import random

    import numpy as np

    from . import textdata as data
    from .tokenizer import eos_id, save_pretrained, text_fingerprint, train_tokenizer

    if args.data_files and args.dataset:
        raise BenchError("use either --dataset or --data-files, not both")
    tok_cap = preset.tokenizer_chars
    if args.dataset or (preset.dataset and not args.data_files):
        src = data.StreamedDataset(args.dataset or preset.dataset, None if args.dataset else preset.dataset_config)
        desc = src.description
        tok_texts = data.take_chars(src.train_texts(), tok_cap or 50_000_000)
        val = src.val_texts(preset.eval_seqs * preset.seq_len * data.CHARS_PER_TOKEN * 2)
        train_texts, train_key, train_max = src.train_texts(), src.key, preset.train_tokens + 1
        log.info("data: %s, streamed (%d validation documents)", desc, len(val))
    else:
        if args.data_files:
            train, val, desc = data.file_documents(args.data_files)
        else:
            train, val, desc = data.corpus_documents()
        log.info("data: %s, %d train / %d validation documents (%.1f / %.1f MB)", desc, len(train), len(val),
                 sum(map(len, train)) / 1e6, sum(map(len, val)) / 1e6)
        tok_texts = train
        if tok_cap is not None and sum(map(len, train)) > tok_cap:
            tok_texts = list(train)
            random.Random(0).shuffle(tok_texts)  # a slice of every source, not just the first one
        train_texts, train_key, train_max = train, "train|" + text_fingerprint(train), None
    tok = train_tokenizer(tok_texts, preset.vocab_size, cache_dir, tok_cap)
    del tok_texts
    save_pretrained(tok, out / "tokenizer")
    eos = eos_id(tok)
    t0 = time.perf_counter()
    train_path = data.cached_encode(tok, train_texts, eos, cache_dir, train_key, train_max)
    val_path = data.cached_encode(tok, val, eos, cache_dir, "val|" + text_fingerprint(val))
    log.info("tokens: %s, %s (%.1f s)", train_path, val_path, time.perf_counter() - t0)
    # the budget checks that need the data
    train_arr, val_arr = np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r")
    data.Batches(train_arr, preset.seq_len, preset.batch_size, 0)
    vb = data.val_blocks(val_arr, preset.seq_len, preset.eval_seqs)
    facts = {"data": desc, "train_tokens_available": int(len(train_arr)), "val_tokens": int(vb.numel() - vb.size(0)),
             "vocab_size": tok.get_vocab_size()}
    return {"train": str(train_path), "val": str(val_path)}, facts


def _run_config(args, preset, names, lrs, device, batch=None, stepping=None):
    config = {"preset": dataclasses.asdict(preset), "optimizers": names, "lr": lrs, "seed": args.seed,
              "device": device, "dataset": args.dataset, "data_files": args.data_files, "sweep": args.sweep,
              "sweep_factors": args.sweep_factors if args.sweep else None}
    if batch:  # only when some job is adaptive (keeps older runs resumable)
        config["adaptive_batch"] = batch
    if args.nproc > 1:  # likewise only for distributed runs
        config["distributed"] = {"nproc": args.nproc, "parallel": args.parallel}
    if stepping and (stepping["clip_mode"] != "global" or stepping["in_backward"]):  # likewise
        config["stepping"] = stepping
    return config


def adaptive_settings(args, preset, names) -> dict | None:
    """``{"batch_schedule", "max_batch_size", "batch_eta", "micro_batch"}`` if any job is adaptive, else None."""
    from .optimizers import REGISTRY
    adaptive = args.batch_schedule == "adaptive" or any(REGISTRY[n].batch_schedule == "adaptive" for n in names)
    if not adaptive:
        if args.max_batch_size is not None or args.batch_eta is not None:
            raise BenchError("--max-batch-size / --batch-eta need --batch-schedule adaptive or an '+adaptive' entry")
        return None
    micro = adaptive_micro_batch(preset.batch_size, preset.micro_batch)
    if preset.batch_size // micro < 2:
        raise BenchError(f"the adaptive batch size needs >= 2 micro-batches per step to estimate the gradient "
                         f"noise: --batch-size {preset.batch_size} with micro-batch {micro}")
    cap = args.max_batch_size if args.max_batch_size is not None else MAX_BATCH_FACTOR * preset.batch_size
    if cap < preset.batch_size or cap % micro:
        raise BenchError(f"--max-batch-size {cap} must be >= --batch-size {preset.batch_size} and a multiple of "
                         f"the micro-batch {micro}")
    eta = args.batch_eta if args.batch_eta is not None else DEFAULT_BATCH_ETA
    if not 0 < eta < float("inf"):
        raise BenchError(f"--batch-eta must be > 0, got {eta}")
    return {"batch_schedule": args.batch_schedule, "max_batch_size": cap, "batch_eta": eta, "micro_batch": micro}


def run(args) -> int:
    import torch

    from .model import build_model, count_params
    from .optimizers import parse_optimizers
    from .report import build_summary, format_table, run_note, write_outputs
    from .launch import run_jobs

    if resolve_task(args) == "finetune":
        from .finetune import run_finetune
        return run_finetune(args, resolve_preset(args))
    for flag in ("base_steps", "sweep_steps", "adapter_rank"):
        if getattr(args, flag, None) is not None:
            raise BenchError(f"--{flag.replace('_', '-')} is an option of the fine-tuning benchmark (--task finetune)")
    if args.stop_after is not None and args.stop_after < 1:
        raise BenchError("--stop-after must be >= 1")
    preset = resolve_preset(args)
    names = parse_optimizers(args.optimizers, preset.optimizers)
    device = _device(args.device)
    lrs = _lrs(args, names, preset.lr_table)
    batch = adaptive_settings(args, preset, names)
    stepping = stepping_settings(args, preset, batch is not None)
    _check_parallel(args, preset, names, device, batch is not None)
    nproc = args.nproc
    workers = args.workers or (1 if device.startswith("cuda") else max(1, _cpu_count() // nproc))
    if workers < 1:
        raise BenchError("--workers must be >= 1")
    factors = None
    if args.sweep == "lr":
        try:
            factors = [float(f) for f in args.sweep_factors.split(",") if f.strip()]
        except ValueError:
            raise BenchError(f"--sweep-factors {args.sweep_factors!r}: expected comma-separated numbers") from None
        if not factors or any(f <= 0 for f in factors):
            raise BenchError("--sweep-factors must be positive numbers")

    timing = args.time_in_backward is not None
    suffix = "-sweep-lr" if args.sweep else ("-time-in-backward" if timing else "")
    out = Path(args.out or f"results/{preset.name}{suffix}")
    ensure_writable_dir(out)
    sweep_temporaries(out)  # left by killed processes (this run's workers have not started yet)
    cache_dir = Path(args.cache_dir or os.environ.get("SNSM_BENCH_CACHE") or ".cache/snsm-bench")
    config = _run_config(args, preset, names, lrs, device, batch, stepping)
    cfg_path = out / "config.json"
    if args.resume:
        if not cfg_path.exists():
            raise BenchError(f"--resume: no run to resume in {out} (no config.json)")
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(config)):
            changed = sorted(k for k in config if json.loads(json.dumps(config)).get(k) != old.get(k))
            raise BenchError(f"--resume: {out} holds a run with different settings ({', '.join(changed)})")
    atomic_write_text(cfg_path, json.dumps(config, indent=1))

    paths, facts = _prepare_data(args, preset, cache_dir, out)
    init_path = out / "init_model.pt"
    model = build_model(preset.model, facts["vocab_size"], preset.seq_len, args.seed)
    counts = count_params(model)
    if not (args.resume and init_path.exists()):
        atomic_torch_save(model.state_dict(), init_path)
    del model

    base = {
        "model": preset.model, "vocab_size": facts["vocab_size"], "seq_len": preset.seq_len,
        "batch_size": preset.batch_size, "micro_batch": preset.micro_batch, "steps": preset.steps,
        "eval_every": preset.eval_every, "eval_seqs": preset.eval_seqs, "eval_batch": preset.micro_batch or preset.batch_size,
        "ckpt_every": preset.ckpt_every, "warmup_frac": preset.warmup_frac, "min_lr_ratio": preset.min_lr_ratio,
        "clip": preset.clip, "rank": preset.rank, "proj_gap": preset.proj_gap, "seed": args.seed,
        "train_tokens": paths["train"], "val_tokens": paths["val"], "init_path": str(init_path),
        "device": device, "threads": 1 if workers > 1 or not device.startswith("cpu") else _cpu_count(),
        "resume": args.resume, "stop_after": args.stop_after, **stepping,
    }
    if device.startswith("cuda") or nproc > 1:
        base["threads"] = max(1, _cpu_count() // (workers * nproc))
    if nproc > 1:  # only then (keeps the checkpoints of one-process runs resumable)
        base.update({"nproc": nproc, "parallel": args.parallel})
    from .optimizers import REGISTRY, learning_rate
    jobs = []
    for n in names:
        spec = REGISTRY[n]
        extra = {}
        if spec.aux_lr_from:  # the non-matrix group's lr: that entry's (with --lr overrides), never swept
            extra["aux_lr"] = lrs.get(spec.aux_lr_from) or learning_rate(spec.aux_lr_from, preset.lr_table)
        if batch and (spec.batch_schedule == "adaptive" or args.batch_schedule == "adaptive"):
            extra.update({"batch_schedule": "adaptive", "max_batch_size": batch["max_batch_size"],
                          "batch_eta": batch["batch_eta"], "micro_batch": batch["micro_batch"]})
        for f in factors or [None]:
            lr = lrs[n] * f if f is not None else lrs[n]
            name = n if f is None else f"{n}@{lr:.3g}"
            jobs.append({**base, **extra, "name": name, "optimizer": n, "lr": lr,
                         "dir": str(out / ("sweep" if f is not None else "") / name)})
    if timing:
        return _time_in_backward(out, jobs, args.time_in_backward, base["threads"])
    log.info("running %d job(s) on %s, %d at a time%s: %s", len(jobs), device, workers,
             f", each as {nproc} {args.parallel} processes" if nproc > 1 else "", ", ".join(j["name"] for j in jobs))
    results = run_jobs(jobs, workers, show_progress=not args.no_progress and sys.stderr.isatty())
    code = report_failures([results[j["name"]] for j in jobs])
    stopped = [n for n, r in results.items() if r.get("status") == "stopped"]
    if stopped:
        log.warning("stopped %d job(s) early (--stop-after); continue with --resume --out %s", len(stopped), out)
        return code

    meta = {
        "preset": preset.name, "model": preset.model, "n_params": counts["total"], "n_params_linear": counts["linear"],
        "n_params_embedding": counts["embedding"], "vocab_size": facts["vocab_size"], "seq_len": preset.seq_len,
        "batch_size": preset.batch_size, "steps": preset.steps, "tokens": preset.train_tokens,
        "eval_every": preset.eval_every, "val_tokens": facts["val_tokens"], "rank": preset.rank,
        "proj_gap": preset.proj_gap, "warmup_frac": preset.warmup_frac, "min_lr_ratio": preset.min_lr_ratio,
        "clip": preset.clip, "clip_mode": stepping["clip_mode"], "in_backward": stepping["in_backward"],
        "weight_decay": 0.0, "seed": args.seed, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "threads_per_worker": base["threads"], "workers": workers, "torch_version": torch.__version__,
        "nproc": nproc, "parallel": args.parallel if nproc > 1 else None,
        "backend": ("nccl" if device.startswith("cuda") else "gloo") if nproc > 1 else None,
        "data": facts["data"], "train_tokens_available": facts["train_tokens_available"],
        "command": shlex.join(["python", "-m", "snsm.bench", *sys.argv[1:]]),
    }
    if batch:
        meta["adaptive_batch"] = {k: v for k, v in batch.items() if k != "batch_schedule"}
        meta["adaptive_batch"]["test"] = "norm"
    ordered = [results[j["name"]] for j in jobs]
    if args.sweep:
        return _sweep_report(out, meta, ordered, names, factors) or code
    summary = build_summary(meta, ordered)
    write_outputs(out, summary)
    table = "\n\n".join(part for part in (run_note(summary), format_table(summary)) if part)
    print(f"\n{table}\n\nwrote {out / 'summary.json'}, {out / 'results.md'}, {out / 'loss.png'}")
    return code


def _time_in_backward(out: Path, jobs: list[dict], steps: int, threads: int) -> int:
    """``--time-in-backward``: :func:`snsm.bench.train.time_step_modes` for each job, in this process,
    one after the other; prints the table and writes ``timing.json``."""
    from .optimizers import PeerUnavailable
    from .train import time_step_modes

    rows, results = [], []
    for job in jobs:
        log.info("timing %s: %d steps per mode, alternating", job["name"], steps)
        try:
            r = time_step_modes({**job, "threads": threads}, steps)
        except PeerUnavailable as e:
            results.append({"optimizer": job["optimizer"], "skipped": True, "reason": str(e)})
            rows.append(f"| {job['name']} | skipped: {e} | | | | | |")
            continue
        results.append(r)
        w = r["wall_s"]
        rows.append(f"| {job['name']} | {1e3 * w['ordinary']['median']:.1f} | {1e3 * w['in_backward']['median']:.1f} "
                    f"| {r['wall_ratio']['median_of_rounds']:.3f} | {r['wall_ratio']['of_means']:.3f} "
                    f"| {r['cpu_ratio']['median_of_rounds']:.3f} | {r['max_param_diff']:.3g} |")
    clip = jobs[0]["clip_mode"] if jobs else "-"
    head = ("| optimizer | ordinary ms/step (median wall) | in backward ms/step (median wall) | in backward / ordinary "
            "(median of rounds, wall) | (of means, wall) | (median of rounds, CPU) | max param diff |")
    table = "\n".join([head, "|" + "---|" * 7, *rows])
    command = shlex.join(["python", "-m", "snsm.bench", *sys.argv[1:]])
    atomic_write_text(out / "timing.json", json.dumps({"command": command, "clip_mode": clip, "steps": steps,
                                                       "results": results}, indent=1))
    print(f"\n{table}\n\n{steps} timed steps per mode, clip {clip}, {threads} thread(s); wrote {out / 'timing.json'}")
    return 0


def report_failures(results: list[dict]) -> int:
    """One line on stderr per failed job (``snsm-bench: error: job NAME failed: REASON``); returns the
    run's exit status: 1 if any job failed, else 0. A skipped job (a peer optimizer that is not
    installed) is not a failure."""
    failed = [r for r in results if r.get("status") == "failed"]
    for r in failed:
        reason = (str(r.get("reason") or "").splitlines() or ["no reason recorded"])[0]
        reason = reason[len("failed: "):] if reason.startswith("failed: ") else reason
        print(f"snsm-bench: error: job {r['name']} failed: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _sweep_report(out: Path, meta: dict, results: list[dict], names: list[str], factors: list[float]) -> int:
    from .report import build_summary, write_outputs

    summary = build_summary(meta, results)
    write_outputs(out, summary)
    best, table = {}, {}
    for n in names:
        rows = [r for r in results if r.get("optimizer") == n]
        table[n] = {f"{r['lr']:.3g}": r.get("final_val_loss") for r in rows}
        ok = [r for r in rows if r.get("final_val_loss") is not None]
        if ok:
            b = min(ok, key=lambda r: r["final_val_loss"])
            best[n] = float(f"{b['lr']:.3g}")
    lines = ["| optimizer | " + " | ".join(f"x{f:g}" for f in factors) + " | best lr |",
             "|---|" + "---|" * len(factors) + "---|"]
    for n in names:
        cells = [("-" if v is None else f"{v:.4f} (lr {k})") for k, v in table[n].items()]
        edge = ""
        if n in best:
            lrs_sorted = sorted(float(k) for k in table[n])
            if best[n] in (lrs_sorted[0], lrs_sorted[-1]) and len(lrs_sorted) > 1:
                edge = " (edge of the grid)"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {best.get(n, '-')}{edge} |")
    md = "\n".join(lines)
    cfg = {meta["preset"]: {"command": meta["command"], "lr": best, "sweep_final_val_loss": table}}
    atomic_write_text(out / "lr.json", json.dumps(cfg, indent=1))
    atomic_write_text(out / "sweep.md", f"# learning-rate sweep, preset `{meta['preset']}`\n\n{md}\n")
    print(f"\n{md}\n\nwrote {out / 'lr.json'} (copy its entry into src/snsm/bench/configs/lr.json) and {out / 'sweep.md'}")
    return 0


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the workers be stopped and waited for
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0, 1 (a job failed), 2 (bad input, an output that
    cannot be written), 130 (Ctrl-C) or 143 (SIGTERM; the workers are stopped and waited for first)."""
    previous = None
    try:  # SIGTERM -> Terminated: run_jobs forwards it to the workers and waits for them
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return run(args)
    except BenchError as e:
        print(f"snsm-bench: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("snsm-bench: terminated; continue with --resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("snsm-bench: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
