r"""Synthetic check of the Subset-Norm theorem's dimension dependence.

``python -m snsm.bench.theory [--out DIR]`` runs AdaGrad (coordinate-wise),
AdaGrad-Norm (one accumulator) and AdaGrad-Subset-Norm (contiguous subsets of
length ``sqrt(d)``) on the same smooth non-convex problems with stochastic
gradients, for several dimensions ``d`` and many seeds, and reports the
high-probability tail the theorem bounds: the 95th percentile over seeds of
``min_{t <= T} ||grad f(x_t)||_2``.

Problem (separable, so ``d`` is the only thing that changes):

.. math::

    f(x) = \sum_{j=1}^d \phi(x_j),\qquad \phi(u) = u^2/2 + \tfrac12 \cos(2u)

``phi''(u) = 1 - 2 cos(2u)`` ranges over [-1, 3]: non-convex, 3-smooth,
bounded below; ``x_0 = 3 + N(0, 1)`` per coordinate. Stochastic gradient
``g = grad f(x) + sigma * m * z`` with ``z ~ N(0, I)`` (sub-gaussian) and a
0/1 mask ``m`` fixed per seed that sets the noise sparsity:

* ``dense``: every coordinate noisy;
* ``sqrt``: ``ceil(sqrt(d))`` random coordinates noisy;
* ``single``: one random coordinate noisy.

Updates (accumulator ``v`` starts at ``b0^2``): AdaGrad
``v_j += g_j^2``; AdaGrad-Norm ``v += ||g||^2``; Subset-Norm
``v_i += sum_{j in S_i} g_j^2``; then ``x -= eta * g / sqrt(v)`` (broadcast).
Each method's ``eta`` is picked once, at the smallest ``d``, from a grid (the
best median of the tail statistic over a separate set of seeds), and then
held fixed for every ``d``: a step size that had to be re-tuned per dimension
would hide the dependence being measured. All seeds of one configuration run
as one ``(seeds, d)`` tensor.

Outputs under ``--out`` (default ``results/theory``): ``theory.md`` (the
table and fitted log-log slopes), ``theory.json`` and, when matplotlib is
installed, ``theory.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

METHODS = ("adagrad", "adagrad-norm", "subset-norm")
REGIMES = ("dense", "sqrt", "single")
ETA_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULTS = dict(dims=(64, 256, 1024, 4096), seeds=256, steps=400, sigma=1.0, b0=1e-2, quantile=0.95)


def subset_length(d: int) -> int:
    """Largest divisor of ``d`` that is ``<= sqrt(d)``."""
    k = max(1, int(math.isqrt(d)))
    while d % k:
        k -= 1
    return k


def noise_mask(regime: str, seeds: int, d: int, gen: torch.Generator) -> torch.Tensor:
    if regime == "dense":
        return torch.ones(seeds, d)
    count = math.ceil(math.sqrt(d)) if regime == "sqrt" else 1
    order = torch.rand(seeds, d, generator=gen).argsort(dim=1)[:, :count]
    return torch.zeros(seeds, d).scatter_(1, order, 1.0)


def grad_f(x: torch.Tensor) -> torch.Tensor:
    return x - torch.sin(2.0 * x)


@torch.no_grad()
def min_grad_norms(method: str, regime: str, d: int, seeds: int, steps: int, eta: float, sigma: float,
                   b0: float, seed: int) -> torch.Tensor:
    """``min_{t <= T} ||grad f(x_t)||_2`` for ``seeds`` independent runs (a ``(seeds,)`` tensor)."""
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + torch.randn(seeds, d, generator=gen)
    scale = sigma * noise_mask(regime, seeds, d, gen)
    if method == "adagrad":
        v = torch.full((seeds, d), b0**2)
    elif method == "adagrad-norm":
        v = torch.full((seeds, 1), b0**2)
    elif method == "subset-norm":
        k = subset_length(d)
        v = torch.full((seeds, d // k, 1), b0**2)
    else:
        raise ValueError(f"Invalid method: {method!r} (allowed: {', '.join(METHODS)})")
    best = torch.full((seeds,), math.inf)
    for _ in range(steps):
        true = grad_f(x)
        best = torch.minimum(best, true.norm(dim=1))
        g = true + scale * torch.randn(seeds, d, generator=gen)
        if method == "adagrad":
            v += g * g
            x -= eta * g / v.sqrt()
        elif method == "adagrad-norm":
            v += (g * g).sum(dim=1, keepdim=True)
            x -= eta * g / v.sqrt()
        else:
            gs = g.view(seeds, d // k, k)
            v += (gs * gs).sum(dim=2, keepdim=True)
            x -= (eta * gs / v.sqrt()).view(seeds, d)
    return torch.minimum(best, grad_f(x).norm(dim=1))


def tune_eta(method: str, regime: str, d: int, seeds: int, steps: int, sigma: float, b0: float,
             quantile: float, grid: Sequence[float] = ETA_GRID) -> float:
    """The grid ``eta`` with the smallest tail statistic at dimension ``d`` (seeds disjoint from the test)."""
    scores = {}
    for eta in grid:
        vals = min_grad_norms(method, regime, d, seeds, steps, eta, sigma, b0, seed=10_000 + d)
        scores[eta] = float(vals.quantile(quantile))
    return min(scores, key=lambda e: (scores[e], e))


def slope(dims: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(d)."""
    xs = [math.log(d) for d in dims]
    ys = [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def run(dims: Iterable[int] = DEFAULTS["dims"], seeds: int = DEFAULTS["seeds"], steps: int = DEFAULTS["steps"],
        sigma: float = DEFAULTS["sigma"], b0: float = DEFAULTS["b0"], quantile: float = DEFAULTS["quantile"],
        regimes: Sequence[str] = REGIMES, methods: Sequence[str] = METHODS, tune: str = "smallest") -> Dict:
    """The experiment; returns a JSON-able dict (``results[regime][method][str(d)]`` = tail statistic)."""
    dims = sorted(int(d) for d in dims)
    if tune not in ("smallest", "each"):
        raise ValueError(f"Invalid tune: {tune!r} (allowed: smallest, each)")
    if len(dims) < 2 or dims[0] < 4:
        raise ValueError(f"Invalid dims: {dims} (allowed: at least two dimensions >= 4)")
    for r in regimes:
        if r not in REGIMES:
            raise ValueError(f"Invalid regime: {r!r} (allowed: {', '.join(REGIMES)})")
    start = time.time()
    out: Dict = {"config": dict(dims=dims, seeds=seeds, steps=steps, sigma=sigma, b0=b0, quantile=quantile,
                                eta_grid=list(ETA_GRID), tune=tune,
                                tuned_at=dims[0] if tune == "smallest" else "each d"),
                 "eta": {}, "results": {}, "median": {}, "slope": {}}
    tune_seeds = max(16, seeds // 4)
    for regime in regimes:
        out["eta"][regime], out["results"][regime], out["median"][regime], out["slope"][regime] = {}, {}, {}, {}
        for method in methods:
            eta = tune_eta(method, regime, dims[0], tune_seeds, steps, sigma, b0, quantile)
            tails, medians, etas = {}, {}, {}
            for d in dims:
                if tune == "each":
                    eta = tune_eta(method, regime, d, tune_seeds, steps, sigma, b0, quantile)
                etas[str(d)] = eta
                vals = min_grad_norms(method, regime, d, seeds, steps, eta, sigma, b0, seed=d)
                tails[str(d)] = float(vals.quantile(quantile))
                medians[str(d)] = float(vals.median())
            out["eta"][regime][method] = eta if tune == "smallest" else etas
            out["results"][regime][method] = tails
            out["median"][regime][method] = medians
            out["slope"][regime][method] = slope(dims, [tails[str(d)] for d in dims])
            log.info("%s %s eta=%g tails=%s", regime, method, eta, tails)
    out["seconds"] = round(time.time() - start, 1)
    out["verdict"] = verdict(out)
    return out


def verdict(out: Dict) -> Dict[str, str]:
    """Per regime: which method's tail grows slowest with d, and which is smallest at the largest d."""
    dmax = str(out["config"]["dims"][-1])
    lines = {}
    for regime, slopes in out["slope"].items():
        flattest = min(slopes, key=slopes.get)
        smallest = min(out["results"][regime], key=lambda m: out["results"][regime][m][dmax])
        sn_best = flattest == "subset-norm" and smallest == "subset-norm"
        lines[regime] = (f"flattest growth: {flattest} (slope {slopes[flattest]:.3f}); smallest tail at d={dmax}: "
                         f"{smallest}; subset-norm best on both: {'yes' if sn_best else 'no'}")
    return lines


def markdown(out: Dict) -> str:
    cfg = out["config"]
    dims = cfg["dims"]
    q = int(round(cfg["quantile"] * 100))
    lines = ["# Subset-Norm dimension dependence (synthetic)", "",
             f"p{q} over {cfg['seeds']} seeds of min_(t<={cfg['steps']}) ||grad f(x_t)||_2; sigma={cfg['sigma']}, "
             f"b0={cfg['b0']}; eta tuned per method "
             + (f"at d={cfg['tuned_at']} from {cfg['eta_grid']} and held fixed; " if cfg.get("tune", "smallest") == "smallest"
                else f"at every d from {cfg['eta_grid']} (eta column: per d); ")
             + f"subsets of length sqrt(d). {out.get('seconds', '?')} s.", "",
             "| noise | method | eta | " + " | ".join(f"d={d}" for d in dims) + " | slope (log-log) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in dims) + " | --- |"]
    for regime, per in out["results"].items():
        for method, tails in per.items():
            eta = out["eta"][regime][method]
            eta = f"{eta:g}" if not isinstance(eta, dict) else "/".join(f"{eta[str(d)]:g}" for d in dims)
            lines.append(f"| {regime} | {method} | {eta} | "
                         + " | ".join(f"{tails[str(d)]:.4g}" for d in dims)
                         + f" | {out['slope'][regime][method]:.3f} |")
    lines += ["", "Verdict (measured):", ""] + [f"- {r}: {v}" for r, v in out["verdict"].items()]
    return "\n".join(lines) + "\n"


def plot(out: Dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is optional
        log.warning("matplotlib unavailable (%s): no plot written", e)
        return False
    regimes = list(out["results"])
    dims = out["config"]["dims"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for method, tails in out["results"][regime].items():
            ax.loglog(dims, [tails[str(d)] for d in dims], marker="o",
                      label=f"{method} (slope {out['slope'][regime][method]:.2f})")
        ax.set_title(f"noise: {regime}")
        ax.set_xlabel("d")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"p{int(round(out['config']['quantile'] * 100))} of min_t ||grad f||")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snsm.bench.theory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/theory", help="output directory (default: results/theory)")
    ap.add_argument("--dims", default=",".join(map(str, DEFAULTS["dims"])), help="comma-separated dimensions")
    ap.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--sigma", type=float, default=DEFAULTS["sigma"])
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, from {', '.join(REGIMES)}")
    ap.add_argument("--tune", choices=["smallest", "each"], default="smallest",
                    help="pick eta at the smallest d and hold it (default), or re-pick it at every d")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    try:
        dims = [int(x) for x in args.dims.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--dims {args.dims!r}: expected comma-separated integers")
    if args.seeds < 2 or args.steps < 1:
        ap.error("--seeds must be >= 2 and --steps >= 1")
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    try:
        out = run(dims=dims, seeds=args.seeds, steps=args.steps, sigma=args.sigma, regimes=regimes,
                  tune=args.tune)
    except ValueError as e:
        ap.error(str(e))
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "theory.json").write_text(json.dumps(out, indent=1))
    md = markdown(out)
    (path / "theory.md").write_text(md)
    plotted = plot(out, path / "theory.png")
    print(md)
    print(f"wrote {path / 'theory.md'}, {path / 'theory.json'}" + (f", {path / 'theory.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
