"""How sensitive is AdaGO to v0, gamma and eps? Evidence for the defaults in snsm.adago.

Teacher-student regression: a 3-layer MLP student (64-256-256-32, GELU) fits a
fixed random teacher on fresh Gaussian inputs every step (batch 128), with
gradient clipping to global norm 1.0 (the paper's recipe), 300 steps, no
schedule. Linear weights get AdaGO, biases AdamW (lr 3e-3) via
snsm.param_groups. Each line varies one option around BASE (the defaults before this experiment) and prints
the final training loss (mean of the last 20 steps; mean and std over seeds),
plus the median per-matrix gradient norm seen (to place gamma).

A second setting, ``--no-clip --target-scale 30``, has per-matrix gradient
norms of order 1 and above (so gamma and eps can matter).

Usage: python benchmarks/adago_defaults.py [--steps 300] [--seeds 3] [--no-clip --target-scale 30 --only gamma,eps]
"""
import argparse
import statistics

import torch
from torch import nn

import snsm

BASE = dict(lr=0.05, v0=1e-2, gamma=1.0, eps=1e-6)


def run(seed, steps, clip=True, target_scale=1.0, **opts):
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 32))
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32))
    opt = snsm.AdaGO(snsm.param_groups(student), **opts)
    gen = torch.Generator().manual_seed(seed + 99)
    losses, norms = [], []
    for _ in range(steps):
        x = torch.randn(128, 64, generator=gen)
        with torch.no_grad():
            y = teacher(x) * target_scale
        loss = nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        norms += [m.weight.grad.norm().item() for m in student if isinstance(m, nn.Linear)]
        opt.step()
        losses.append(loss.item())
    return statistics.mean(losses[-20:]), statistics.median(norms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-clip", action="store_true", help="no gradient clipping (larger, spikier gradient norms)")
    ap.add_argument("--target-scale", type=float, default=1.0, help="multiply the teacher's outputs")
    ap.add_argument("--only", default=None, help="comma-separated options to vary (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = [("lr", v) for v in (0.01, 0.02, 0.05, 0.1, 0.2)]
    grid += [("v0", v) for v in (1e-3, 1e-2, 1e-1, 1.0)]
    grid += [("gamma", v) for v in (0.03, 0.1, 0.3, 1.0, 10.0, float("inf"))]
    grid += [("eps", v) for v in (0.0, 1e-6, 1e-5, 1e-4, 1e-3)]
    if args.only:
        grid = [(k, v) for k, v in grid if k in args.only.split(",")]
    print(f"defaults {BASE}; {args.steps} steps, {args.seeds} seeds; clip {not args.no_clip}, "
          f"target scale {args.target_scale}; final loss mean +- std")
    print("| option | value | final loss | median per-matrix grad norm |")
    print("| --- | --- | --- | --- |")
    for key, value in grid:
        res = [run(s, args.steps, clip=not args.no_clip, target_scale=args.target_scale, **{**BASE, key: value})
               for s in range(args.seeds)]
        ls = [r[0] for r in res]
        print(f"| {key} | {value:g} | {statistics.mean(ls):.5f} +- {statistics.pstdev(ls):.5f} | "
              f"{statistics.mean(r[1] for r in res):.3g} |", flush=True)


if __name__ == "__main__":
    main()
