"""Step time of this checkout's snsm against another checkout's, side by side in one process.

For a refactor that must not change speed: both versions step the same LLaMA-shaped parameters
(``snsm.bench.speed.llama_like``), interleaved in blocks of steps with torch's fused AdamW, so
drift and neighbours on a shared machine affect every row alike. Prints median ms per step and
the ratio to fused AdamW for each version.

    git worktree add /tmp/snsm_old <commit>
    python benchmarks/compare_versions.py --other /tmp/snsm_old/src --models llama_20m,llama_60m
"""
import argparse
import importlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

import snsm
import snsm._kernels
from snsm.bench.speed import llama_like


def load_other(src: str):
    """The other checkout's ``snsm`` package, imported under the name ``snsm_other``. Where its C++
    kernel source is this checkout's (compare with ``git diff``), it uses this checkout's build."""
    root = pathlib.Path(tempfile.mkdtemp())
    shutil.copytree(pathlib.Path(src) / "snsm", root / "snsm_other",
                    ignore=shutil.ignore_patterns("bench", "__pycache__"))
    sys.path.insert(0, str(root))
    other = importlib.import_module("snsm_other")
    kernels = importlib.import_module("snsm_other._kernels")
    if hasattr(kernels, "_tried"):  # the same kernel source: hand it this checkout's build, not a second one
        kernels._module, kernels._tried = snsm._kernels.cpu_kernel(), True
    return other


def rows(other, rank: int, gap: int):
    sm = dict(rank=rank, proj_gap=gap)
    return {
        "AdamW fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        "AdamWSN (this)": lambda m: snsm.AdamWSN(snsm.param_groups(m), lr=1e-2),
        "AdamWSN (other)": lambda m: other.AdamWSN(other.param_groups(m), lr=1e-2),
        "AdamWSNSM (this)": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, **sm), lr=1e-2),
        "AdamWSNSM (other)": lambda m: other.AdamWSNSM(other.param_groups(m, **sm), lr=1e-2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="the other checkout's src/ folder")
    ap.add_argument("--models", default="llama_20m")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--proj-gap", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    other = load_other(args.other)
    print("| model | optimizer | median ms | vs fused AdamW |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        built = {}
        for label, make in rows(other, args.rank, args.proj_gap).items():
            model = llama_like(name)
            opt = make(model)
            for _ in range(2):
                opt.step()  # state and kernels ready before the timing
            built[label] = opt
        times = {label: [] for label in built}
        for _ in range(args.rounds):
            for label, opt in built.items():
                start = time.perf_counter()
                for _ in range(args.block):
                    opt.step()
                times[label].append((time.perf_counter() - start) / args.block * 1e3)
        base = statistics.median(times["AdamW fused"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {label} | {med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
