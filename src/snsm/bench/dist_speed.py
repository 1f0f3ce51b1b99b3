"""Distributed optimizer step time: snsm vs torch AdamW under the same FSDP2 or DDP wrapping.

``python -m snsm.bench.dist_speed --nproc 2 --parallel fsdp`` launches
``torch.distributed.run`` (gloo on CPU, nccl on GPU) on LLaMA-shaped parameters
(see :mod:`snsm.bench.speed`), gives every parameter a fixed gradient, and times
``optimizer.step()`` per optimizer, interleaved in blocks. Rank 0 prints a
table (median step time, ratio to AdamW under the same wrapping) and writes it
to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import snsm
    from snsm.bench.speed import llama_like

    torch.set_num_threads(args.threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")

    def wrapped():
        model = llama_like(args.model).to(device)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        if args.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for module in model:  # every layer its own FSDP unit (the container has no forward)
                fully_shard(module, mesh=mesh)
            for p, g in zip(model.parameters(), grads):
                from torch.distributed.tensor import distribute_tensor

                p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        return model

    sm = dict(rank=args.rank, proj_gap=args.proj_gap)
    factories = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),  # the ratios' base
        "AdamW fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        "AdamWSN": lambda m: snsm.AdamWSN(snsm.param_groups(m), lr=1e-2),
        "AdamWSNSM": lambda m: snsm.AdamWSNSM(snsm.param_groups(m, **sm), lr=1e-2),
    }
    opts = {name: make(wrapped()) for name, make in factories.items()}
    times = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()
    for _ in range(args.blocks):
        for name, opt in opts.items():
            for _ in range(args.block):
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        base, fused = statistics.median(times["AdamW"]), statistics.median(times["AdamW fused"])
        rows = [dict(optimizer=n, median_ms=1e3 * statistics.median(t), mean_ms=1e3 * statistics.mean(t),
                     vs_adamw=statistics.median(t) / base, vs_fused=statistics.median(t) / fused, steps=len(t))
                for n, t in times.items()]
        head = f"{args.parallel} on {world} {device.type} processes, {args.model} shapes, rank {args.rank}, gap {args.proj_gap}"
        lines = [head, "", "| optimizer | median ms | mean ms | vs AdamW foreach | vs AdamW fused |", "|---|---|---|---|---|"]
        lines += [f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | {r['vs_adamw']:.2f}x | {r['vs_fused']:.2f}x |"
                  for r in rows]
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"dist_speed_{args.parallel}.json").write_text(json.dumps(dict(config=vars(args), rows=rows), indent=1))
        (out / f"dist_speed_{args.parallel}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snsm.bench.dist_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--proj-gap", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/speed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # options travel in the environment: torchrun would parse them as its own
        worker(argparse.Namespace(**json.loads(os.environ["SNSM_DIST_SPEED"])))
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "snsm.bench.dist_speed", "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), SNSM_DIST_SPEED=json.dumps(vars(args)))
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
