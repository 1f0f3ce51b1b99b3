"""The fine-tuning benchmark: ``python -m snsm.bench --task finetune`` (preset ``finetune``).

Pipeline:

1. **Held-out works.** Every document of one source of the embedded corpus (Milton,
   :mod:`snsm.bench.finetune_data`) is kept away from pretraining: the tokenizer is trained on the
   rest of the corpus and the base model never sees a held-out token.
2. **The base model**, pretrained by the benchmark itself: the preset's model with AdamW on the
   rest of the corpus (:data:`BASE`: 500 steps (``--base-steps``) at lr 3e-3 of the fine-tuning batch
   size and twice its sequence length, 8 x 256 in the preset; the pretraining benchmark's recipe and
   its own job runner, :func:`snsm.bench.launch.run_jobs`). It is cached
   under the cache directory (``finetune-base-<key>/base.pt``, the key a hash of everything that
   makes it: tokenizer, data, model, steps, lr, seed) and trained only if missing; an interrupted
   pretraining continues from its checkpoint.
3. **Two tasks** built from the held-out works: ``lm`` (domain adaptation: language modelling,
   metric validation perplexity) and ``cls`` (which work a passage comes from, a
   sequence-classification head: mean of the base model's final hidden states over the passage,
   then a new linear layer; metric validation accuracy).
4. **Methods** (:data:`METHODS`): full fine-tuning with ``adamw``, ``adamw-sn``, ``adamw-snsm``
   and ``galore`` (the pretraining benchmark's builders, :mod:`snsm.bench.optimizers`; GaLore is
   the ``galore-torch`` peer and reported as skipped when it is missing), and adapters of equal
   rank (:data:`ADAPTER_RANK`, alpha 2r, on every attention and MLP projection, through peft):
   ``lora-adamw`` (LoRA, ``torch.optim.AdamW``), ``lora-adamw-sn`` (LoRA, ``snsm.AdamWSN`` grouped by
   ``snsm.param_groups``: Subset-Norm on the factors), ``dora-adamw`` (peft's DoRA, AdamW) and
   ``loft`` (LoRA, ``snsm.LoFTAdamW``). The classification head is new and always trained (in the
   adapter runs as peft's ``modules_to_save``); the LM head and the embedding are frozen in the
   adapter runs.
5. **Learning rates.** Each method and task runs a short sweep first (``--sweep-steps`` steps at
   ``--sweep-factors`` times :data:`LR` of the method; best by the task's metric, then by
   validation loss), then the full run at the best lr. ``--lr NAME=LR`` fixes a method's lr (no
   sweep for it); ``--sweep-steps 0`` turns the sweep off. The sweep is recorded in
   ``sweep.json`` and ``sweep.md``.

Conventions of the pretraining benchmark: one fresh single-threaded worker process per job (a job
is one method: on each task its sweep, then its full run), two at a time on two cores; every run
checkpoints every ``--ckpt-every`` steps and ``--resume`` continues a killed run from there (a run
that finished is reused), ending where an uninterrupted run ends; ``summary.json``,
``results.md`` (a table per task: final metric, tokens to reach full-FT AdamW's final metric,
trainable parameters, optimizer-state bytes, CPU time per step), ``finetune_lm.png`` and
``finetune_cls.png`` (validation curves) in ``--out`` (default ``results/finetune``).

Recipe: the pretraining benchmark's (warm-up over 10% of the steps, cosine to 10% of the peak lr,
global gradient clipping at 1.0, weight decay 0), the same batches for every method. LoFT clips
with its own ``max_grad_norm`` (the global norm of the full-space projected gradients, as its
paper does; clipping the raw factor gradients would be another method).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import BenchError
from .checkpoint import export_state, import_state
from .fileio import atomic_torch_save, atomic_write, atomic_write_text, ensure_writable_dir, log_to_file, \
    save_figure, sweep_temporaries
from .launch import run_jobs, serve

log = logging.getLogger(__name__)

FULL = ("adamw", "adamw-sn", "adamw-snsm", "galore")
ADAPTERS = ("lora-adamw", "lora-adamw-sn", "dora-adamw", "loft")
METHODS = FULL + ADAPTERS
TASKS = ("lm", "cls")
TASK_TITLES = {"lm": "domain adaptation: language modelling on the held-out works",
               "cls": "classification: which held-out work a passage comes from"}
#: the centre of each method's learning-rate sweep (x0.3, x1, x3 by default). Set after a first, interrupted run
#: of the preset with lower centres (AdamW and LoFT 1e-3, GaLore, LoRA and DoRA 3e-3, LoRA + AdamW-SN 1e-2), where
#: AdamW, GaLore and the LoRA runs were best at the top of their grids and AdamW-SN / -SNSM (1e-2) in the middle.
#: Subset-Norm takes about 10x Adam's lr on full matrices and ~3x on rank-8 factors (docs/finetuning.md); LoFT's
#: lr is AdamW's lr on W. The measured sweep: docs/bench/finetune_results.md.
LR = {"adamw": 3e-3, "adamw-sn": 1e-2, "adamw-snsm": 1e-2, "galore": 1e-2,
      "lora-adamw": 1e-2, "lora-adamw-sn": 3e-2, "dora-adamw": 1e-2, "loft": 3e-3}
ADAPTER_RANK = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BETAS, EPS = (0.9, 0.999), 1e-8
SWEEP_STEPS = 60


@dataclasses.dataclass(frozen=True)
class BaseSettings:
    """How the base model is pretrained (with AdamW, the pretraining benchmark's recipe); ``seq_len``,
    ``batch_size`` and ``eval_seqs`` are set from the fine-tuning preset (2x its sequence, its batch)."""

    seq_len: int = 256
    batch_size: int = 8
    steps: int = 500
    lr: float = 3e-3
    eval_seqs: int = 32


BASE = BaseSettings()


# --- the parent: data, base model, jobs, report ----------------------------------------------------

def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_lrs(items: list[str]) -> dict[str, float]:
    """``--lr NAME=LR`` for the fine-tuning methods."""
    from .optimizers import parse_lr_overrides
    return parse_lr_overrides(items, lambda name: name in METHODS,
                              f"a fine-tuning method ({', '.join(METHODS)})")


def parse_methods(text: str | None, default: tuple[str, ...]) -> list[str]:
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BenchError(f"unknown fine-tuning method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not names:
        raise BenchError("--optimizers is empty")
    return list(dict.fromkeys(names))


def check_args(args) -> None:
    """One-line errors for the options the fine-tuning benchmark does not take."""
    refused = [("--dataset", args.dataset), ("--data-files", args.data_files), ("--sweep", args.sweep),
               ("--nproc", args.nproc != 1), ("--parallel", args.parallel), ("--in-backward", args.in_backward),
               ("--time-in-backward", args.time_in_backward is not None), ("--micro-batch", args.micro_batch),
               ("--batch-schedule adaptive", args.batch_schedule != "fixed"), ("--clip", args.clip),
               ("--max-batch-size", args.max_batch_size is not None), ("--batch-eta", args.batch_eta is not None)]
    for flag, bad in refused:
        if bad:
            raise BenchError(f"{flag} is not an option of the fine-tuning benchmark (--task finetune)")
    for flag in ("base_steps", "sweep_steps", "adapter_rank"):
        v = getattr(args, flag, None)
        if v is not None and v < (0 if flag == "sweep_steps" else 1):
            raise BenchError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'sweep_steps' else 1}, got {v}")


def _device(spec: str) -> str:
    import torch
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {spec}: CUDA is not available here")
    if spec != "cpu" and not spec.startswith("cuda"):
        raise BenchError(f"unknown --device {spec!r}; use cpu, cuda, cuda:N or auto")
    return spec


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(preset, base: BaseSettings, cache_dir: Path, out: Path) -> dict:
    """Tokenizer (trained without the held-out works, on at most ``preset.tokenizer_chars`` characters
    of them, shuffled by document), the pretraining token streams (cached; the train stream is the
    shuffled documents up to twice the base's token budget, so the base sees no token twice), and the
    two tasks' arrays (``out/data``). Returns paths and facts."""
    import random

    import numpy as np

    from . import finetune_data as fd
    from . import textdata
    from .tokenizer import eos_id, save_pretrained, text_fingerprint, train_tokenizer

    train_docs, val_docs, held = fd.pretraining_documents()
    train_texts = [d["text"] for d in train_docs]
    random.Random(0).shuffle(train_texts)  # every source in the tokenizer's sample and in the base's stream
    val_texts = [d["text"] for d in val_docs]
    log.info("data: embedded corpus without %r: %d train / %d validation documents for pretraining; %d held-out "
             "documents (%.1f MB)", fd.HELD_OUT_SOURCE, len(train_docs), len(val_docs), len(held),
             sum(len(d["text"]) for d in held) / 1e6)
    tok = train_tokenizer(train_texts, preset.vocab_size, cache_dir, preset.tokenizer_chars)
    save_pretrained(tok, out / "tokenizer")
    eos = eos_id(tok)
    train_fp = text_fingerprint(train_texts)
    budget = 2 * base.steps * base.batch_size * (base.seq_len + 1)
    pre_train = textdata.cached_encode(tok, train_texts, eos, cache_dir, "finetune-pretrain|" + train_fp, budget)
    pre_val = textdata.cached_encode(tok, val_texts, eos, cache_dir, "finetune-pretrain-val|" + text_fingerprint(val_texts))
    enc = fd.encode_documents(tok, held, eos)
    lm_train, lm_val = fd.lm_streams(enc)
    works, cls_train, cls_val = fd.class_regions(held, enc)
    ddir = out / "data"
    ddir.mkdir(parents=True, exist_ok=True)
    paths = {"pretrain_train": str(pre_train), "pretrain_val": str(pre_val),
             "lm_train": str(ddir / "lm_train.npy"), "lm_val": str(ddir / "lm_val.npy"), "cls": str(ddir / "cls.npz")}
    arrays = {f"train_{i}": a for i, a in enumerate(cls_train)}
    arrays.update({f"val_{i}": a for i, a in enumerate(cls_val)})
    for key, save in (("lm_train", lambda f: np.save(f, lm_train)), ("lm_val", lambda f: np.save(f, lm_val)),
                      ("cls", lambda f: np.savez(f, **arrays))):
        atomic_write(Path(paths[key]), lambda tmp, save=save: _with_file(tmp, save))
    facts = {
        "held_out_source": fd.HELD_OUT_SOURCE, "held_out_documents": [d["title"] for d in held],
        "works": works, "vocab_size": tok.get_vocab_size(), "tokenizer_key": _digest([train_fp, preset.vocab_size]),
        "lm_train_tokens": int(len(lm_train)), "lm_val_tokens": int(len(lm_val)),
        "cls_train_tokens": [int(len(a)) for a in cls_train], "cls_val_tokens": [int(len(a)) for a in cls_val],
        "pretrain_train_tokens": int(len(np.load(pre_train, mmap_mode="r"))),
        "val_fraction": fd.VAL_FRACTION,
    }
    return {"paths": paths, "facts": facts}


def _with_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)


def _ckpt_every(steps: int) -> int:
    """A checkpoint interval that divides ``steps`` (so the last checkpoint is the final model), about steps/4."""
    return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= max(1, steps // 4))


def ensure_base(preset, base: BaseSettings, data: dict, cache_dir: Path, seed: int, device: str,
                show_progress: bool) -> tuple[Path, dict]:
    """The cached base model's weights (``base.pt``), pretrained now if missing; and its record."""
    import torch

    from .model import build_model

    ident = {"model": preset.model, "tokenizer": data["facts"]["tokenizer_key"], "seq_len": base.seq_len,
             "batch_size": base.batch_size, "steps": base.steps, "lr": base.lr, "seed": seed,
             "held_out": data["facts"]["held_out_source"], "recipe": "adamw, warmup 0.1, cosine to 0.1, clip 1.0"}
    bdir = cache_dir / f"finetune-base-{_digest(ident)}"
    weights, record = bdir / "base.pt", bdir / "base.json"
    if weights.exists() and record.exists():
        log.info("base model: cached %s", weights)
        return weights, json.loads(record.read_text())
    bdir.mkdir(parents=True, exist_ok=True)
    init_path = bdir / "init_model.pt"
    if not init_path.exists():
        atomic_torch_save(build_model(preset.model, data["facts"]["vocab_size"], base.seq_len, seed).state_dict(),
                          init_path)
    ckpt = _ckpt_every(base.steps)
    job = {"name": "base-pretraining", "optimizer": "adamw", "lr": base.lr, "dir": str(bdir / "run"),
           "model": preset.model, "vocab_size": data["facts"]["vocab_size"], "seq_len": base.seq_len,
           "batch_size": base.batch_size, "micro_batch": None, "steps": base.steps,
           "eval_every": max(1, base.steps // 5), "eval_seqs": base.eval_seqs, "eval_batch": base.batch_size,
           "ckpt_every": ckpt, "warmup_frac": 0.1, "min_lr_ratio": 0.1, "clip": 1.0, "rank": 32, "proj_gap": 30,
           "seed": seed, "train_tokens": data["paths"]["pretrain_train"], "val_tokens": data["paths"]["pretrain_val"],
           "init_path": str(init_path), "device": device, "threads": 1 if device.startswith("cuda") else _cpu_count(),
           "resume": True, "stop_after": None, "clip_mode": "global", "in_backward": False}
    log.info("base model: pretraining %s with AdamW for %d steps (sequence %d, batch %d) on the corpus without the "
             "held-out works; cached in %s", preset.model, base.steps, base.seq_len, base.batch_size, bdir)
    t0 = time.perf_counter()
    result = run_jobs([job], 1, show_progress)["base-pretraining"]
    if result.get("status") != "done":
        raise BenchError(f"pretraining the base model failed: {result.get('reason', result.get('status'))}")
    ck = torch.load(Path(job["dir"]) / "checkpoint.pt", weights_only=True, map_location="cpu")
    if ck["run"]["step"] != base.steps:
        raise BenchError(f"the base model's last checkpoint is at step {ck['run']['step']}, not {base.steps}")
    atomic_torch_save(ck["model"], weights)
    rec = {**ident, "final_val_loss": result["final_val_loss"], "curve": result["curve"],
           "tokens": result["tokens"], "step_time_s": result["step_time_s"],
           "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(record, json.dumps(rec, indent=1))
    return weights, rec


def run_finetune(args, preset) -> int:
    """``python -m snsm.bench --task finetune``: the whole benchmark (``preset`` resolved by the CLI)."""
    import torch

    check_args(args)
    if args.stop_after is not None and args.stop_after < 1:
        raise BenchError("--stop-after must be >= 1")
    methods = parse_methods(args.optimizers, preset.optimizers)
    fixed = parse_lrs(args.lr)
    device = _device(args.device)
    workers = args.workers or (1 if device.startswith("cuda") else max(1, _cpu_count()))
    if workers < 1:
        raise BenchError("--workers must be >= 1")
    try:
        factors = [float(f) for f in args.sweep_factors.split(",") if f.strip()]
    except ValueError:
        raise BenchError(f"--sweep-factors {args.sweep_factors!r}: expected comma-separated numbers") from None
    if not factors or any(not f > 0 for f in factors):
        raise BenchError("--sweep-factors must be positive numbers")
    sweep_steps = SWEEP_STEPS if args.sweep_steps is None else args.sweep_steps
    if sweep_steps and sweep_steps < 2:
        raise BenchError(f"--sweep-steps must be 0 (no sweep) or >= 2, got {sweep_steps}")
    # the base pretrains on sequences twice the fine-tuning length (256 for the preset's 128)
    base = dataclasses.replace(BASE, seq_len=2 * preset.seq_len, batch_size=preset.batch_size,
                               eval_seqs=max(1, preset.eval_seqs // 2),
                               **({"steps": args.base_steps} if args.base_steps else {}))
    if base.steps < 2:
        raise BenchError(f"--base-steps must be >= 2, got {base.steps}")
    adapter_rank = args.adapter_rank or ADAPTER_RANK
    out = Path(args.out or f"results/{preset.name}")
    ensure_writable_dir(out)
    sweep_temporaries(out)
    cache_dir = Path(args.cache_dir or os.environ.get("SNSM_BENCH_CACHE") or ".cache/snsm-bench")
    config = {"task": "finetune", "preset": dataclasses.asdict(preset), "methods": methods, "fixed_lr": fixed,
              "seed": args.seed, "device": device, "sweep_factors": factors, "sweep_steps": sweep_steps,
              "base": dataclasses.asdict(base), "adapter_rank": adapter_rank}
    cfg_path = out / "config.json"
    if args.resume:
        if not cfg_path.exists():
            raise BenchError(f"--resume: no run to resume in {out} (no config.json)")
        old = json.loads(cfg_path.read_text())
        new = json.loads(json.dumps(config))
        if old != new:
            changed = sorted(k for k in new if new.get(k) != old.get(k))
            raise BenchError(f"--resume: {out} holds a run with different settings ({', '.join(changed)})")
    atomic_write_text(cfg_path, json.dumps(config, indent=1))
    show = not args.no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    data = prepare_data(preset, base, cache_dir, out)
    base_path, base_rec = ensure_base(preset, base, data, cache_dir, args.seed, device, show)
    n_classes = len(data["facts"]["works"])
    threads = 1 if workers > 1 or not device.startswith("cpu") else _cpu_count()
    jobs = []
    for m in methods:  # one worker per method: its sweep and full run on each task, one after the other
        lr = fixed.get(m, LR[m])
        lrs = [] if (m in fixed or not sweep_steps) else [float(f"{lr * f:.3g}") for f in factors]
        jobs.append({
            "name": m, "method": m, "lr": lr, "sweep_lrs": lrs, "tasks": list(TASKS),
            "sweep_steps": sweep_steps, "dir": str(out / m), "model": preset.model,
            "vocab_size": data["facts"]["vocab_size"], "seq_len": preset.seq_len, "batch_size": preset.batch_size,
            "steps": preset.steps, "eval_every": preset.eval_every, "eval_seqs": preset.eval_seqs,
            "ckpt_every": preset.ckpt_every, "warmup_frac": preset.warmup_frac,
            "min_lr_ratio": preset.min_lr_ratio, "clip": preset.clip, "rank": preset.rank,
            "proj_gap": preset.proj_gap, "adapter_rank": adapter_rank, "seed": args.seed,
            "base_path": str(base_path), "n_classes": n_classes, "data": data["paths"], "device": device,
            "threads": threads, "resume": args.resume, "stop_after": args.stop_after,
            "total_steps": len(TASKS) * (len(lrs) * sweep_steps + preset.steps),
        })
    # the longest jobs first (measured: DoRA and LoFT steps cost ~1.3x, SNSM and GaLore ~1.1x AdamW's), so
    # that the two workers finish together
    cost = {"dora-adamw": 0, "loft": 1, "galore": 2, "adamw-snsm": 3}
    order = sorted(jobs, key=lambda j: cost.get(j["method"], len(cost)))
    log.info("running %d fine-tuning job(s) on %s, %d at a time, each on %s: %s", len(jobs), device, workers,
             " and ".join(TASKS), ", ".join(j["name"] for j in order))
    results = run_ft_jobs(order, workers, show)
    failed = [r for r in results.values() if r.get("status") == "failed"]
    for r in failed:
        reason = (str(r.get("reason") or "").splitlines() or ["no reason recorded"])[0]
        print(f"snsm-bench: error: job {r['name']} failed: {reason}", file=sys.stderr)
    code = 1 if failed else 0
    if any(r.get("status") == "stopped" for r in results.values()):
        log.warning("stopped early (--stop-after); continue with --resume --out %s", out)
        return code
    meta = {
        "preset": preset.name, "task": "finetune", "model": preset.model, "vocab_size": data["facts"]["vocab_size"],
        "seq_len": preset.seq_len, "batch_size": preset.batch_size, "steps": preset.steps,
        "tokens": preset.train_tokens, "eval_every": preset.eval_every, "eval_seqs": preset.eval_seqs,
        "subspace_rank": preset.rank, "proj_gap": preset.proj_gap, "adapter_rank": adapter_rank,
        "lora_alpha": 2 * adapter_rank, "lora_targets": list(LORA_TARGETS), "warmup_frac": preset.warmup_frac,
        "min_lr_ratio": preset.min_lr_ratio, "clip": preset.clip, "weight_decay": 0.0, "seed": args.seed,
        "device": device, "workers": workers, "threads_per_worker": threads, "torch_version": torch.__version__,
        "sweep_steps": sweep_steps, "sweep_factors": factors, "lr_centres": {m: LR[m] for m in methods},
        "fixed_lr": fixed, "base": base_rec, "data": data["facts"],
        "command": shlex.join(["python", "-m", "snsm.bench", *sys.argv[1:]]),
        "wall_s_this_invocation": round(time.perf_counter() - t0, 1),
    }
    per_task = []
    for j in jobs:
        r = results[j["name"]]
        for task in TASKS:
            if r.get("status") == "done":
                per_task.append(r["tasks"][task])
            else:
                per_task.append({**{k: r.get(k) for k in ("method", "lr", "status", "reason")}, "task": task,
                                 "name": f"{task}/{j['method']}"})
    summary = build_ft_summary(meta, per_task)
    write_ft_outputs(out, summary)
    print("\n" + "\n\n".join(format_ft_table(summary, t) for t in TASKS)
          + f"\n\nwrote {out / 'summary.json'}, {out / 'results.md'}, {out / 'sweep.md'}, "
            f"{out / 'finetune_lm.png'}, {out / 'finetune_cls.png'}")
    return code


# --- the scheduler: one fresh worker process per job -------------------------------------------------

def ft_worker_main(job: dict, q=None, parent: int | None = None) -> None:
    """Entry point of a worker process (as :func:`snsm.bench.launch.worker_main`, for a fine-tuning job)."""
    serve(job, q, parent, _finetuning)


def _finetuning(job: dict, progress) -> str:
    log_to_file(job, "worker.log")
    return run_ft_job(job, progress)


def _failed_finetuning(job: dict, reason: str) -> dict:
    return {"name": job["name"], "method": job["method"], "lr": job["lr"], "status": "failed", "reason": reason}


def run_ft_jobs(jobs: list[dict], workers: int, show_progress: bool = True) -> dict[str, dict]:
    """Run the fine-tuning ``jobs`` in up to ``workers`` spawned processes (a finished job is reused
    with ``resume``), through the pretraining benchmark's scheduler; returns each job's result."""
    return run_jobs(jobs, workers, show_progress, target=ft_worker_main, steps_key="total_steps",
                    failed=_failed_finetuning)


# --- in the worker: models, optimizers, one run -----------------------------------------------------

def _classifier_cls():
    from torch import nn

    class Classifier(nn.Module):
        """The base model's transformer (``LlamaModel``, final norm included), mean-pooled over the
        passage, then a new linear head."""

        def __init__(self, backbone, n_classes: int):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(backbone.config.hidden_size, n_classes)

        def forward(self, input_ids, **_):
            h = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
            return self.head(h.mean(dim=1))

    return Classifier


def build_task_model(job: dict):
    """The model a job trains: the base model (LM task) or the classifier on it (cls task), for the
    adapter methods wrapped by peft (LoRA / DoRA of rank ``adapter_rank``, alpha 2r, on every
    attention and MLP projection; the classification head trainable as ``modules_to_save``)."""
    import torch

    from .model import build_model

    model = build_model(job["model"], job["vocab_size"], job["seq_len"], job["seed"])
    model.load_state_dict(torch.load(job["base_path"], weights_only=True, map_location="cpu"))
    if job["task"] == "cls":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job["seed"] + 1)
            model = _classifier_cls()(model.model, job["n_classes"])
    if job["method"] in ADAPTERS:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=job["adapter_rank"], lora_alpha=2 * job["adapter_rank"], lora_dropout=0.0,
                         target_modules=list(LORA_TARGETS), use_dora=job["method"] == "dora-adamw",
                         modules_to_save=["head"] if job["task"] == "cls" else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job["seed"] + 2)
            model = get_peft_model(model, cfg)
    return model


def build_optimizer(job: dict, model, lr: float):
    """The method's optimizer over the model's trainable parameters (weight decay 0)."""
    import torch

    import snsm

    from .model import model_size
    from .optimizers import REGISTRY, BuildContext

    m = job["method"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if m in ("adamw", "lora-adamw", "dora-adamw"):
        return torch.optim.AdamW(trainable, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if m == "lora-adamw-sn":
        return snsm.AdamWSN(snsm.param_groups(model), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if m == "loft":
        return snsm.LoFTAdamW(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, max_grad_norm=job["clip"])
    size = model_size(job["model"])
    ctx = BuildContext(rank=job["rank"], proj_gap=job["proj_gap"], hidden=size.hidden, heads=size.heads,
                       seed=job["seed"])
    return REGISTRY[m].build(model, lr, ctx)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TaskData:
    """A job's training batches and validation set."""

    def __init__(self, job: dict):
        import numpy as np

        from . import finetune_data as fd
        from .textdata import Batches, val_blocks

        self.task = job["task"]
        if self.task == "lm":
            self.train = Batches(np.load(job["data"]["lm_train"]), job["seq_len"], job["batch_size"], job["seed"])
            self.val = (val_blocks(np.load(job["data"]["lm_val"]), job["seq_len"], job["eval_seqs"]), None)
        else:
            z = np.load(job["data"]["cls"])
            n = job["n_classes"]
            self.train = fd.Passages([z[f"train_{i}"] for i in range(n)], job["seq_len"], job["batch_size"], job["seed"])
            self.val = fd.val_passages([z[f"val_{i}"] for i in range(n)], job["seq_len"],
                                       max(1, job["eval_seqs"] // 2))

    def batch(self, step: int):
        return (self.train.batch(step), None) if self.task == "lm" else self.train.batch(step)


def task_loss(model, task: str, x, y):
    """``(loss, logits)`` of a batch: next-token cross-entropy (lm) or the class' cross-entropy (cls)."""
    from torch import nn

    if task == "lm":
        inputs, targets = x[:, :-1], x[:, 1:]
        logits = model(input_ids=inputs, use_cache=False).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)), None
    logits = model(input_ids=x)
    return nn.functional.cross_entropy(logits.float(), y), logits


def evaluate_task(model, task: str, val, batch: int, device) -> dict:
    """Validation loss (and accuracy for cls) over the fixed validation set."""
    import torch

    x_all, y_all = val
    model.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, x_all.size(0), batch):
            x = x_all[i:i + batch].to(device)
            y = y_all[i:i + batch].to(device) if y_all is not None else None
            loss, logits = task_loss(model, task, x, y)
            total += float(loss) * x.size(0)
            if logits is not None:
                correct += int((logits.argmax(-1) == y).sum())
            count += x.size(0)
    model.train()
    out = {"val_loss": total / count}
    if task == "lm":
        out["metric"] = math.exp(out["val_loss"])
    else:
        out["metric"] = correct / count
    return out


METRIC = {"lm": ("val_ppl", "validation perplexity", False), "cls": ("val_acc", "validation accuracy", True)}


def _identity(run: dict) -> dict:
    keys = ("task", "method", "lr", "model", "vocab_size", "seq_len", "batch_size", "steps", "eval_every",
            "eval_seqs", "warmup_frac", "min_lr_ratio", "clip", "rank", "proj_gap", "adapter_rank", "seed",
            "base_path", "n_classes")
    return {k: run[k] for k in keys}


def train_run(run_job: dict, progress, budget: dict) -> dict:
    """One training run (one method, one task, one lr, ``steps`` steps) in ``run_job["dir"]``:
    resumes from its checkpoint, writes ``result.json`` at the end, and returns its result
    (``status`` ``stopped`` when ``budget["left"]`` steps of this invocation ran out)."""
    import torch

    from .optimizers import state_bytes
    from .train import cosine_with_warmup

    rdir = Path(run_job["dir"])
    rpath = rdir / "result.json"
    if run_job.get("resume") and rpath.exists():
        res = json.loads(rpath.read_text())
        if res.get("identity") == json.loads(json.dumps(_identity(run_job))):
            budget["offset"] += run_job["steps"]
            return res
    rdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run_job["threads"])
    device = torch.device(run_job["device"])
    task, steps = run_job["task"], run_job["steps"]
    tokens_per_step = run_job["batch_size"] * run_job["seq_len"]
    data = TaskData(run_job)
    model = build_task_model(run_job).to(device)
    trainable = count_trainable(model)
    peft_count = model.get_nb_trainable_parameters()[0] if hasattr(model, "get_nb_trainable_parameters") else None
    opt = build_optimizer(run_job, model, run_job["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, run_job["warmup_frac"],
                                                                      run_job["min_lr_ratio"]))
    clip_outside = run_job["method"] != "loft"  # LoFT clips the full-space projected gradients itself
    params = [p for p in model.parameters() if p.requires_grad]
    run = {"step": 0, "curve": [], "train_loss": [], "step_time": 0.0, "timed_steps": 0, "opt_time": 0.0,
           "diverged": False}
    ckpt = rdir / "checkpoint.pt"
    ident = _identity(run_job)
    if run_job.get("resume") and ckpt.exists():
        try:
            ck = torch.load(ckpt, weights_only=True, map_location=device)
        except Exception as e:
            raise BenchError(f"{ckpt} is not a readable checkpoint (delete it to rerun the run): "
                             f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from e
        if ck.get("identity") != json.loads(json.dumps(ident)):
            raise BenchError(f"{ckpt} was written by a different configuration; use a new --out")
        model.load_state_dict(ck["model"])
        import_state(opt, ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        run.update(ck["run"])
        log.info("resumed %s at step %d", rdir, run["step"])

    def save() -> None:
        atomic_torch_save({"identity": ident, "model": model.state_dict(), "optimizer": export_state(opt),
                           "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "run": run}, ckpt)

    def eval_now() -> None:
        ev = evaluate_task(model, task, data.val, run_job["batch_size"] * 2, device)
        run["curve"].append([run["step"] * tokens_per_step, ev["val_loss"], ev["metric"]])

    ema = None
    while run["step"] < steps:
        step = run["step"]
        if step % run_job["eval_every"] == 0 and (not run["curve"] or run["curve"][-1][0] != step * tokens_per_step):
            eval_now()
        x, y = data.batch(step)
        x = x.to(device)
        y = y.to(device) if y is not None else None
        c0 = time.process_time()
        loss, _ = task_loss(model, task, x, y)
        loss.backward()
        if clip_outside:
            torch.nn.utils.clip_grad_norm_(params, run_job["clip"])
        o0 = time.process_time()
        opt.step()
        o1 = time.process_time()
        opt.zero_grad(set_to_none=True)
        cpu = time.process_time() - c0
        sched.step()
        run["step"] = step + 1
        loss = float(loss.detach())
        if step >= 2:
            run["step_time"] += cpu
            run["opt_time"] += o1 - o0
            run["timed_steps"] += 1
        run["train_loss"].append(loss)
        if not math.isfinite(loss):
            run["diverged"] = True
            log.warning("%s: non-finite training loss at step %d; stopping", rdir, step + 1)
            break
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        per = run["step_time"] / run["timed_steps"] if run["timed_steps"] else cpu
        progress.send("step", budget["offset"] + run["step"], budget["total"], ema, tokens_per_step / max(per, 1e-9))
        if budget["left"] is not None:
            budget["left"] -= 1
        if run["step"] % run_job["ckpt_every"] == 0 or budget["left"] == 0:
            save()
        if budget["left"] == 0 and run["step"] < steps:
            return {"status": "stopped"}
    if not run["diverged"] and (not run["curve"] or run["curve"][-1][0] != run["step"] * tokens_per_step):
        eval_now()
    budget["offset"] += steps
    final = run["curve"][-1] if run["curve"] and not run["diverged"] else None
    n = run["timed_steps"]
    res = {
        "identity": ident, "status": "done", "lr": run_job["lr"], "steps": run["step"],
        "tokens": run["step"] * tokens_per_step, "diverged": run["diverged"],
        "final_val_loss": final[1] if final else None, "final_metric": final[2] if final else None,
        "trainable_params": trainable, "peft_trainable_params": peft_count,
        "total_params": sum(p.numel() for p in model.parameters()),
        "state_bytes": state_bytes(opt), "step_time_s": run["step_time"] / n if n else None,
        "optimizer_step_time_s": run["opt_time"] / n if n else None, "step_time_kind": "process CPU time",
        "final_train_loss": run["train_loss"][-1] if run["train_loss"] else None, "curve": run["curve"],
    }
    atomic_write_text(rpath, json.dumps(res, indent=1))
    atomic_write_text(rdir / "curve.csv", "tokens,val_loss,metric\n"
                      + "".join(f"{t},{v:.6f},{m:.6f}\n" for t, v, m in run["curve"]))
    return res


def _better(task: str, a: dict, b: dict | None) -> bool:
    """Whether sweep point ``a`` beats ``b``: the task's metric first, then the validation loss."""
    if a.get("final_metric") is None:
        return False
    if b is None or b.get("final_metric") is None:
        return True
    higher = METRIC[task][2]
    if a["final_metric"] != b["final_metric"]:
        return (a["final_metric"] > b["final_metric"]) if higher else (a["final_metric"] < b["final_metric"])
    return a["final_val_loss"] < b["final_val_loss"]


def _task_runs(job: dict, task: str, progress, budget: dict) -> dict:
    """One method on one task: the sweep, then the full run at the best lr. Its result, or ``{"status":
    "stopped"}``."""
    tdir = Path(job["dir"]) / task
    sweep, best = [], None
    for lr in job["sweep_lrs"]:
        sub = {**job, "task": task, "lr": lr, "steps": job["sweep_steps"], "eval_every": job["sweep_steps"],
               "ckpt_every": job["sweep_steps"], "dir": str(tdir / "sweep" / f"lr{lr:g}")}
        r = train_run(sub, progress, budget)
        if r["status"] == "stopped":
            return r
        point = {"lr": lr, "final_metric": r["final_metric"], "final_val_loss": r["final_val_loss"],
                 "diverged": r["diverged"]}
        sweep.append(point)
        if _better(task, point, best):
            best = point
    lr = best["lr"] if best is not None else job["lr"]
    if job["sweep_lrs"] and best is None:
        log.warning("%s/%s: every sweep point diverged; the full run takes the centre lr %g", task, job["name"], lr)
    r = train_run({**job, "task": task, "lr": lr, "dir": str(tdir / "main")}, progress, budget)
    if r["status"] == "stopped":
        return r
    lrs = sorted(p["lr"] for p in sweep)
    edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
    return {**{k: v for k, v in r.items() if k != "identity"}, "name": f"{task}/{job['method']}", "task": task,
            "method": job["method"], "kind": "full" if job["method"] in FULL else "adapter", "lr": lr,
            "lr_centre": job["lr"], "sweep": sweep, "sweep_steps": job["sweep_steps"] if sweep else 0,
            "lr_at_grid_edge": edge}


def _method_job(job: dict, progress) -> dict:
    budget = {"left": job.get("stop_after"), "offset": 0, "total": job["total_steps"]}
    tasks = {}
    for task in job["tasks"]:
        r = _task_runs(job, task, progress, budget)
        if r["status"] == "stopped":
            return {"name": job["name"], "status": "stopped"}
        tasks[task] = r
    return {"name": job["name"], "method": job["method"], "lr": job["lr"], "status": "done", "tasks": tasks}


def run_ft_job(job: dict, progress) -> str:
    """One fine-tuning job (a method: on each task its sweep, then its full run) in this process;
    writes ``result.json`` unless stopped early. Returns the status."""
    from .optimizers import PeerUnavailable

    jdir = Path(job["dir"])
    jdir.mkdir(parents=True, exist_ok=True)
    try:
        result = _method_job(job, progress)
    except PeerUnavailable as e:
        result = {"name": job["name"], "method": job["method"], "lr": job["lr"], "status": "skipped",
                  "reason": str(e)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        log.error("%s failed:\n%s", job["name"], traceback.format_exc())
        first = str(e).splitlines()[0] if str(e) else ""
        result = {"name": job["name"], "method": job["method"], "lr": job["lr"], "status": "failed", "reason": f"failed: {type(e).__name__}: {first} (see {jdir / 'worker.log'})"}
    if result["status"] != "stopped":
        atomic_write_text(jdir / "result.json", json.dumps(result, indent=1))
    return result["status"]


# --- the report -----------------------------------------------------------------------------------

def tokens_to_reach(curve, target, higher: bool) -> int | None:
    """First evaluated token count whose metric reaches ``target`` (>= if ``higher``, else <=)."""
    if target is None or not curve:
        return None
    for t, _, m in curve:
        if m is not None and math.isfinite(m) and (m >= target if higher else m <= target):
            return int(t)
    return None


def build_ft_summary(meta: dict, results: list[dict]) -> dict:
    """``meta`` and, per task, one entry per method with the AdamW-relative columns filled in."""
    tasks = {}
    for task in TASKS:
        key, title, higher = METRIC[task]
        rows = [r for r in results if r.get("task") == task]
        ref = next((r for r in rows if r.get("method") == "adamw" and r.get("status") == "done"), None)
        ref_final = ref.get("final_metric") if ref else None
        entries = []
        for r in rows:
            e = dict(r)
            e["skipped"] = r.get("status") != "done"
            e[key] = r.get("final_metric")
            if not e["skipped"]:
                e["tokens_to_adamw_final"] = tokens_to_reach(r.get("curve"), ref_final, higher)
                e["state_ratio_vs_adamw"] = (r["state_bytes"] / ref["state_bytes"]
                                             if ref and ref.get("state_bytes") else None)
                e["step_time_ratio_vs_adamw"] = (r["step_time_s"] / ref["step_time_s"]
                                                 if ref and ref.get("step_time_s") and r.get("step_time_s") else None)
            entries.append(e)
        tasks[task] = {"title": TASK_TITLES[task], "metric": key, "metric_name": title, "higher_is_better": higher,
                       "reference": "adamw" if ref else None, "adamw_final": ref_final, "methods": entries}
    return {**meta, "tasks": tasks}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _tok(t) -> str:
    if t is None:
        return "never"
    return f"{t / 1e6:.2f}M" if t >= 1e6 else (f"{t / 1e3:.0f}k" if t >= 1e3 else str(t))


def _bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def format_ft_table(summary: dict, task: str) -> str:
    t = summary["tasks"][task]
    metric_fmt = ".2f" if task == "lm" else ".3f"
    head = (f"| method | kind | lr | final {t['metric_name']} | val loss | tokens to AdamW's final | trainable params "
            "| optimizer state | state vs AdamW | step time (ms, CPU) | step vs AdamW |")
    lines = [f"**{t['title']}** (metric: {t['metric_name']}; full-FT AdamW's final: "
             f"{_fmt(t['adamw_final'], metric_fmt)})", "", head, "|" + "---|" * 11]
    for e in t["methods"]:
        if e["skipped"]:
            lines.append(f"| {e['method']} | {'full' if e['method'] in FULL else 'adapter'} | - | "
                         f"{e.get('status')}: {(str(e.get('reason') or '').splitlines() or [''])[0]} |" + " |" * 7)
            continue
        lines.append("| " + " | ".join([
            e["method"], e["kind"], f"{e['lr']:g}" + (" (edge)" if e.get("lr_at_grid_edge") else ""),
            _fmt(e["final_metric"], metric_fmt), _fmt(e["final_val_loss"], ".4f"),
            _tok(e["tokens_to_adamw_final"]) if t["reference"] else "-", f"{e['trainable_params']:,}",
            _bytes(e["state_bytes"]), _fmt(e.get("state_ratio_vs_adamw"), ".3f"),
            _fmt(e["step_time_s"] * 1e3 if e.get("step_time_s") else None, ".0f"),
            _fmt(e.get("step_time_ratio_vs_adamw"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


def format_sweep(summary: dict) -> str:
    lines = []
    for task in TASKS:
        t = summary["tasks"][task]
        fmt = ".2f" if task == "lm" else ".3f"
        rows = [e for e in t["methods"] if e.get("sweep")]
        if not rows:
            continue
        n = max(len(e["sweep"]) for e in rows)
        lines += [f"**{task}** ({t['metric_name']} after {rows[0]['sweep_steps']} steps; best by it, then by "
                  "validation loss)", "", "| method | " + " | ".join(f"lr {i + 1}" for i in range(n)) + " | best lr |",
                  "|---|" + "---|" * (n + 1)]
        for e in rows:
            cells = [f"{p['lr']:g}: " + ("diverged" if p["final_metric"] is None else format(p["final_metric"], fmt))
                     for p in e["sweep"]]
            lines.append(f"| {e['method']} | " + " | ".join(cells + [""] * (n - len(cells)))
                         + f" | {e['lr']:g}{' (edge of the grid)' if e.get('lr_at_grid_edge') else ''} |")
        lines.append("")
    return "\n".join(lines)


def format_ft_results_md(s: dict) -> str:
    b = s["base"]
    d = s["data"]
    works = ", ".join(d["works"])
    out = [
        f"# snsm fine-tuning benchmark: preset `{s['preset']}`", "",
        f"Command: `{s['command']}`", "",
        f"Base model: `{s['model']}` (vocabulary {s['vocab_size']}), pretrained by the benchmark with AdamW (lr "
        f"{b['lr']:g}) for {b['steps']} steps of {b['batch_size']} x {b['seq_len']} tokens on the embedded corpus "
        f"without the held-out source `{d['held_out_source']}` (tokenizer trained without it too); its final "
        f"validation loss on the pretraining data: {_fmt(b.get('final_val_loss'), '.4f')}. Cached and reused.", "",
        f"Held-out works ({len(d['held_out_documents'])} documents, never seen in pretraining): {works}. Every "
        f"document's last {d['val_fraction']:.0%} of tokens is validation, the rest training "
        f"(LM: {d['lm_train_tokens'] / 1e3:.0f}k train / {d['lm_val_tokens'] / 1e3:.0f}k validation tokens).", "",
        f"Fine-tuning: {s['steps']} steps of {s['batch_size']} sequences of {s['seq_len']} tokens "
        f"({s['tokens'] / 1e3:.0f}k tokens), evaluated every {s['eval_every']} steps; warm-up 10%, cosine to "
        f"{s['min_lr_ratio']:g} of the peak, clip {s['clip']:g}, weight decay 0. Adapters: rank {s['adapter_rank']}, "
        f"alpha {s['lora_alpha']}, on {', '.join(s['lora_targets'])} (peft); embedding and LM head frozen; the "
        f"classification head (mean-pooled final hidden state -> linear, {len(d['works'])} classes) always trained. "
        f"Subspace rank {s['subspace_rank']}, projector refresh every {s['proj_gap']} steps. Learning rate: best of "
        f"a {s['sweep_steps']}-step sweep at x{', x'.join(f'{f:g}' for f in s['sweep_factors'])} of each method's "
        "centre (see below). Seed "
        f"{s['seed']}, device {s['device']}, {s['workers']} worker(s) of {s['threads_per_worker']} thread(s), torch "
        f"{s['torch_version']}.", "",
    ]
    for task in TASKS:
        out += [format_ft_table(s, task), "", f"![{task}](finetune_{task}.png)", ""]
    out += ["Tokens to AdamW's final: first evaluated token count at which the method reaches full-FT AdamW's final "
            "metric (never: not within the run). Trainable params: parameters with gradients (adapters: factors, "
            "DoRA magnitudes and the classification head; equal to peft's count). Optimizer state: bytes of the "
            "tensors in the optimizer state. Step time: CPU time of a training step (forward, backward, clip, "
            "optimizer step), one thread, mean after the first two steps.", "",
            "## Learning-rate sweep", "", format_sweep(s)]
    return "\n".join(out)


def plot_ft(summary: dict, task: str, path: Path) -> None:
    """Validation metric vs fine-tuning tokens, every method of one task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["tasks"][task]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    for i, e in enumerate(t["methods"]):
        curve = e.get("curve") or []
        if e.get("skipped") or not curve:
            continue
        ref = e["method"] == "adamw"
        ax.plot([c[0] / 1e3 for c in curve], [c[2] for c in curve], "-" if e["method"] in FULL else "--",
                marker="o", ms=3, lw=2.5 if ref else 1.5, color="black" if ref else colors[i % len(colors)],
                label=f"{e['method']} (lr {e['lr']:g})")
    if t["adamw_final"] is not None:
        ax.axhline(t["adamw_final"], color="gray", lw=0.8, ls=":", label="full-FT AdamW final")
    if task == "lm":
        finals = [e["final_metric"] for e in t["methods"] if not e.get("skipped") and e.get("final_metric")]
        starts = [e["curve"][0][2] for e in t["methods"] if not e.get("skipped") and e.get("curve")]
        if finals and starts:
            ax.set_ylim(min(finals) * 0.97, max(starts) * 1.03)
    ax.set_xlabel("fine-tuning tokens (thousands)")
    ax.set_ylabel(t["metric_name"])
    ax.set_title(f"{summary['model']} fine-tuned on held-out works: {task} ({t['title'].split(':')[0]})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def write_ft_outputs(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "results.md", format_ft_results_md(summary))
    sweep = {task: {e["method"]: {"best_lr": e.get("lr"), "centre": e.get("lr_centre"), "steps": e.get("sweep_steps"),
                                  "points": e.get("sweep") or []}
                    for e in summary["tasks"][task]["methods"] if not e.get("skipped")} for task in TASKS}
    atomic_write_text(out / "sweep.json", json.dumps({"command": summary["command"], "factors": summary["sweep_factors"],
                                                      "tasks": sweep}, indent=1))
    atomic_write_text(out / "sweep.md", f"# learning-rate sweep, preset `{summary['preset']}`\n\n"
                      f"Command: `{summary['command']}`\n\n{format_sweep(summary)}")
    for task in TASKS:
        plot_ft(summary, task, out / f"finetune_{task}.png")


__all__ = ["METHODS", "FULL", "ADAPTERS", "TASKS", "LR", "ADAPTER_RANK", "BASE", "BaseSettings", "run_finetune",
           "run_ft_jobs", "run_ft_job", "build_task_model", "build_optimizer", "count_trainable", "train_run",
           "tokens_to_reach", "build_ft_summary", "format_ft_table", "write_ft_outputs", "prepare_data",
           "ensure_base", "parse_methods", "parse_lrs", "check_args"]
