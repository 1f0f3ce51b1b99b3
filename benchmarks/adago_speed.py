"""AdaGO's step time against pytorch-optimizer's AdaGO on the same matrices (LLaMA-20M/60M shapes).

Both orthogonalize in bfloat16 (Muon's choice; ``ns_dtype="bfloat16"`` here), both route the
same matrices (every 2-D weight but the embedding and the head) to the orthogonalized update and
the rest to AdamW. The peer's step size divides by the sum of squared norms rather than its square
root, so this compares speed, not trajectories. Timed interleaved (one block of steps each, in
turn), median per step over ``--runs`` rounds, on ``--threads`` CPU threads.

    pip install --no-deps --target /tmp/po pytorch-optimizer==4.1.0
    PYTHONPATH=/tmp/po python benchmarks/adago_speed.py --models llama_20m --runs 3
"""
import argparse
import statistics
import time

import torch

import snsm
from snsm.bench.speed import llama_like


def split(model):
    params = list(model.parameters())
    matrices = [p for p in params[1:-1] if p.ndim == 2]
    ids = {id(p) for p in matrices}
    return matrices, [p for p in params if id(p) not in ids]


def ours(model):
    matrices, rest = split(model)
    return snsm.AdaGO([{"params": matrices}, {"params": rest, "subset_size": None}], ns_dtype="bfloat16")


def peer(model):
    from pytorch_optimizer import AdaGO

    matrices, rest = split(model)
    return AdaGO([dict(params=matrices, use_muon=True), dict(params=rest, use_muon=False)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama_20m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | snsm AdaGO ms/step | pytorch-optimizer AdaGO ms/step | ratio (snsm / peer) |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        setups = {}
        for label, make in (("snsm", ours), ("peer", peer)):
            model = llama_like(name)
            opt = make(model)
            opt.step()  # state created outside the timing
            setups[label] = opt
        times = {label: [] for label in setups}
        for _ in range(args.runs):
            for label, opt in setups.items():  # interleaved: the same machine state for both
                start = time.perf_counter()
                for _ in range(args.block):
                    opt.step()
                times[label].append((time.perf_counter() - start) / args.block * 1e3)
        a, b = statistics.median(times["snsm"]), statistics.median(times["peer"])
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
