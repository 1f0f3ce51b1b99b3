"""Optimizer step-time benchmark: snsm's paths side by side with torch's AdamW.

``python -m snsm.bench.speed`` (``make speed``) builds the parameter shapes of
LLaMA-20M and LLaMA-60M (embedding and untied head included), gives every
parameter a fixed random gradient, and times ``optimizer.step()`` for each
optimizer and path in one process, interleaved in blocks so machine noise hits
all alike. It prints and saves (``--out``, default ``results/speed``) a table
with, per row: median step time as a ratio to ``torch.optim.AdamW(fused=True)``
and to ``AdamW(foreach=True)``; for subspace-momentum rows the mean over a
whole ``proj_gap`` cycle (every projector refresh included) and the worst
single step as a ratio to the median; optimizer-state bytes; and the peak
tensor memory of a step (parameters, gradients, state and temporaries, as
torch's MemTracker counts them; LAPACK workspace excluded). The row
``AdamW compiled`` is ``torch.optim.AdamW`` with its step under
``torch.compile``, the yardstick for snsm's compiled rows. The row
``SM matmuls via torch.mm`` times just the two rank-r products per subspace
matrix through ``torch.mm`` (:class:`TorchMatmuls`): the compute an unfused
subspace step spends on this machine with the BLAS torch ships (the one-pass
CPU kernel's own AVX2 tiles can come under it).

``--device cuda`` runs the same table on a GPU (every step timed between two
``torch.cuda.synchronize()``; the fast path there is the Triton kernel).
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import time

import torch
from torch import nn

import snsm

logger = logging.getLogger(__name__)

SHAPES = {  # hidden, intermediate, layers, vocab (the GaLore / SN-SM LLaMA configs, 32k vocab)
    "llama_20m": (256, 688, 4, 32000),
    "llama_60m": (512, 1376, 8, 32000),
}


def llama_like(name: str, device="cpu") -> nn.Module:
    """The parameter shapes of ``name`` on ``device``, each with a fixed random gradient (the same on every device)."""
    h, i, layers, v = SHAPES[name]
    torch.manual_seed(0)
    mods = [nn.Embedding(v, h)]
    for _ in range(layers):
        mods += [nn.Linear(h, h, bias=False) for _ in range(4)]
        mods += [nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)]
        mods += [nn.RMSNorm(h), nn.RMSNorm(h)]
    mods += [nn.RMSNorm(h), nn.Linear(h, v, bias=False)]
    model = nn.ModuleList(mods).to(device)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device)
    return model


class Compiled:
    """An optimizer whose ``step`` is ``torch.compile``'d (inductor; compiled on the first two calls)."""

    def __init__(self, opt):
        self.opt, self.state = opt, opt.state
        # Every optimizer's step runs through torch.optim's one wrapper frame, whose graphs dynamo
        # keys by the optimizer object: give each compiled optimizer its own room in that frame's
        # cache, or past the limit (8) later rows would silently run eager.
        torch._dynamo.config.recompile_limit += 8
        self.step = torch.compile(opt.step)

    def state_dict(self):
        return self.opt.state_dict()


class TorchMatmuls:
    """Not an optimizer: only the two rank-r products a subspace step needs per matrix that
    ``param_groups`` routes to Subspace-Momentum (``R = A Q`` and ``X Q^T``, ``torch.mm`` into
    preallocated outputs). Its step time is what those products cost through torch's BLAS,
    whatever the memory passes and refreshes cost, measured beside the optimizers."""

    def __init__(self, model: nn.Module, rank: int):
        self.state = {}
        gen = torch.Generator().manual_seed(2)
        self.work = []
        for p in snsm.param_groups(model, rank=rank)[0]["params"]:
            if p.ndim != 2 or rank >= min(p.shape):
                continue
            a = p.grad if p.shape[0] >= p.shape[1] else p.grad.T
            q = torch.linalg.qr(torch.randn(a.shape[1], rank, generator=gen)).Q.to(a.device)
            self.work.append((a, q, a.new_empty(a.shape[0], rank), a.new_empty(a.shape)))

    def step(self):
        for a, q, r, u in self.work:
            torch.mm(a, q, out=r)
            torch.mm(r, q.T, out=u)


TORCH_MATMULS = "SM matmuls via torch.mm"


def configs(rank: int, gap: int):
    """name -> factory(model). Default options unless the name says otherwise."""
    sm = dict(rank=rank, proj_gap=gap)
    return {
        "AdamW fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        "AdamW foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
        # torch's own AdamW under torch.compile: the yardstick for the compiled rows below
        "AdamW compiled": lambda m: Compiled(torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)),
        "AdamWSN": lambda m: snsm.AdamWSN(snsm.param_groups(m), lr=1e-2),
        "AdamWSN foreach": lambda m: snsm.AdamWSN(snsm.param_groups(m), lr=1e-2, foreach=True),
        "AdamWSN compiled": lambda m: Compiled(snsm.AdamWSN(snsm.param_groups(m), lr=torch.tensor(1e-2))),
        "AdamWSN reference": lambda m: snsm.AdamWSN(snsm.param_groups(m), lr=1e-2, fused=False, foreach=False),
        "RMSpropSN": lambda m: snsm.RMSpropSN(snsm.param_groups(m)),
        "AdamWSNSM": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, **sm), lr=1e-2),
        "AdamWSNSM compiled": lambda m: Compiled(snsm.AdamWSNSM(snsm.param_groups(m, **sm), lr=torch.tensor(1e-2))),
        "AdamWSNSM reference": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, **sm), lr=1e-2, fused=False,
                                                        foreach=False),
        "AdamWSNSM synchronized": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, stagger=False, **sm), lr=1e-2),
        "AdamWSNSM svd": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, proj="svd", **sm), lr=1e-2),
        "AdamWSNSM randomized": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, proj="randomized", **sm), lr=1e-2),
        "AdamWSNSM srht": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, proj="srht", **sm), lr=1e-2),
        "AdamWSNSM topk": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, proj="topk", **sm), lr=1e-2),
        "AdaGradSNSM": lambda m: snsm.AdaGradSNSM(snsm.param_groups(m, **sm)),
        "SGDSM": lambda m: snsm.SGDSM(snsm.param_groups(m, **sm)),
        TORCH_MATMULS: lambda m: TorchMatmuls(m, rank),
    }


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def peak_step_bytes(model, opt) -> int:
    """Peak tensor bytes during one step (parameters, gradients, state and temporaries), as
    torch's MemTracker counts them; LAPACK's internal SVD workspace is not a tensor and is missed."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        opt.step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(per_device["Total"] for per_device in snapshot.values()))


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _progress(total: int, name: str):
    """A tqdm bar over the interleaved steps (on stderr), or nothing where tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=f"timing {name}", unit="step", dynamic_ncols=True, mininterval=1.0)


def _synchronizer(device: torch.device):
    """What makes a step's time its own on ``device``: nothing on CPU, a device synchronisation on CUDA."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_steps(opt, n: int, device="cpu"):
    sync = _synchronizer(torch.device(device))
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def run_model(name: str, selected, rank: int, gap: int, block: int, cycles: int, reference_steps: int,
              device="cpu"):
    factories = configs(rank, gap)
    opts, times, models = {}, {}, {}
    for label in selected:
        models[label] = llama_like(name, device)
        opts[label] = factories[label](models[label])
        time_steps(opts[label], 2, device)  # state creation and the first bases (compiled rows: both graphs)
        times[label] = []
    # interleave blocks; a subspace row runs `cycles` full proj_gap cycles in total
    total = max(gap * cycles, block)
    with _progress(total, name) as bar:
        for start in range(0, total, block):
            for label, opt in opts.items():
                if "reference" in label and len(times[label]) >= reference_steps:
                    continue
                times[label] += time_steps(opt, block, device)
            bar.update(min(block, total - start))
    base_fused = statistics.median(times["AdamW fused"])
    base_foreach = statistics.median(times["AdamW foreach"])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        opt = opts[label].opt if isinstance(opts[label], Compiled) else opts[label]
        matmuls_only = isinstance(opt, TorchMatmuls)
        subspace = isinstance(opt, (snsm.AdamWSNSM, snsm.AdaGradSNSM, snsm.SGDSM))
        full_cycle = subspace and "reference" not in label
        rows.append(dict(
            model=name, optimizer=label, steps=len(ts), median_ms=1e3 * med,
            vs_fused=med / base_fused, vs_foreach=med / base_foreach,
            amortized_vs_fused=(statistics.mean(ts) / statistics.mean(times["AdamW fused"])) if full_cycle else None,
            worst_over_median=(max(ts) / med) if full_cycle else None,
            state_bytes=state_bytes(opt),
            peak_step_bytes=None if matmuls_only else peak_step_bytes(models[label], opt),
        ))
    return rows


def table(rows) -> str:
    head = ("| model | optimizer | steps | median ms | vs fused AdamW | vs foreach AdamW | amortized vs fused "
            "| worst / median | state MB | step peak MB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        am = f"{r['amortized_vs_fused']:.2f}x" if r["amortized_vs_fused"] is not None else ""
        wm = f"{r['worst_over_median']:.1f}" if r["worst_over_median"] is not None else ""
        peak = f"{r['peak_step_bytes'] / 2**20:.1f}" if r["peak_step_bytes"] is not None else ""
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['steps']} | {r['median_ms']:.1f} | {r['vs_fused']:.2f}x "
            f"| {r['vs_foreach']:.2f}x | {am} | {wm} | {r['state_bytes'] / 2**20:.1f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snsm.bench.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama_20m,llama_60m")
    ap.add_argument("--optimizers", default=",".join(k for k in configs(64, 200) if k not in
                                                     ("AdamWSNSM svd", "AdamWSNSM topk")),
                    help="comma-separated rows (AdamW fused and foreach are always included)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--proj-gap", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=1, help="proj_gap cycles timed per subspace row")
    ap.add_argument("--block", type=int, default=20, help="steps per interleaved block")
    ap.add_argument("--reference-steps", type=int, default=20, help="steps timed on the slow reference path")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (the GPU table)")
    ap.add_argument("--out", default="results/speed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    known = configs(args.rank, args.proj_gap)
    selected = ["AdamW fused", "AdamW foreach"] + [
        s.strip() for s in args.optimizers.split(",") if s.strip() and s.strip() not in ("AdamW fused", "AdamW foreach")]
    unknown = [s for s in selected if s not in known]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad_models = [m for m in models if m not in SHAPES]
    if unknown or bad_models:
        ap.error(f"unknown optimizer rows {unknown} / models {bad_models}; rows: {', '.join(known)}; "
                 f"models: {', '.join(SHAPES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        ap.error(f"--device {args.device!r}: {err}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    rows = []
    for name in models:
        rows += run_model(name, selected, args.rank, args.proj_gap, args.block, args.cycles, args.reference_steps,
                          device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m snsm.bench.speed " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    meta = dict(command=command.strip(), device=str(device), where=where, threads=args.threads, rank=args.rank,
                proj_gap=args.proj_gap, torch=torch.__version__, rows=rows)
    (out / "speed.json").write_text(json.dumps(meta, indent=1))
    text = table(rows)
    (out / "speed.md").write_text(f"`{meta['command']}` (torch {torch.__version__}, {where})\n\n{text}\n")
    print(text)
    logger.info("wrote %s and %s", out / "speed.md", out / "speed.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
