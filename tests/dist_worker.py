"""Worker for tests/test_distributed.py: run with torch.distributed.run (gloo, CPU).

usage: python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py SCENARIO OUT_JSON [CKPT_DIR]
Rank 0 writes a JSON dict of named boolean / numeric results to OUT_JSON.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import snsm

torch.set_num_threads(1)
dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
MESH = init_device_mesh("cpu", (WORLD,))
SM = ("AdamWSNSM", "AdaGradSNSM", "SGDSM")


def configs():
    out = []
    for name in ("AdamWSN", "AdaGradSN", "RMSpropSN"):
        for subset in ("auto", 16, None):
            out.append((name, dict(subset_size=subset)))
    for name in SM:
        for proj in ("svd", "randomized", "srht", "topk", "uniform"):
            for refresh in ("transport", "reset"):
                out.append((name, dict(rank=2, proj_gap=3, proj=proj, refresh=refresh)))
    out.append(("AdamWSNSM", dict(rank=2, proj_gap=3, subset_size=16)))
    out.append(("AdaGO", {}))  # orthogonalized matrices (an all-gather of the update), AdamW for the rest
    out.append(("AdaGO", dict(nesterov=True, adaptive=False)))
    return out


def base_model():
    torch.manual_seed(0)
    # 7x9: uneven rows over 2 ranks; 12x7 tall; 5x12 wide (per-column subsets cross shards)
    return nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 12, bias=False), nn.Tanh(), nn.Linear(12, 5))


def make(name, model, options):
    return getattr(snsm, name)(snsm.param_groups(model, **options), lr=1e-2)


def sharded(model):
    model = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=MESH)
    fully_shard(model, mesh=MESH)
    return model


def batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 9, generator=g), torch.randn(8, 5, generator=g)


def train(model, opt, steps, start=0, split=True):
    for t in range(start, start + steps):
        x, y = batch(t)
        if split:
            x, y = x.chunk(WORLD)[RANK], y.chunk(WORLD)[RANK]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def full(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def close(a, b):
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


def label(name, options):
    return name + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


def parity():
    res = {}
    for name, options in configs():
        ref = base_model()
        train(ref, make(name, ref, options), 6, split=False)
        m = sharded(base_model())
        train(m, make(name, m, options), 6)
        res[label(name, options)] = close(full(m), list(ref.parameters()))
    return res


def ddp():
    res = {}
    for name, options in configs()[::3]:
        ref = base_model()
        train(ref, make(name, ref, options), 5, split=False)
        m = DistributedDataParallel(base_model())
        train(m, make(name, m.module, options), 5)
        res[label(name, options)] = close(list(m.module.parameters()), list(ref.parameters()))
    return res


def dcp_resume(ckpt_root):
    res = {}
    for name, options in configs()[::2]:
        key = label(name, options)
        m = sharded(base_model())
        o = make(name, m, options)
        train(m, o, 6)
        straight = full(m)
        m2 = sharded(base_model())
        o2 = make(name, m2, options)
        train(m2, o2, 3)
        msd, osd = get_state_dict(m2, o2)
        path = os.path.join(ckpt_root, key.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "-"))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        m3 = sharded(base_model())
        o3 = make(name, m3, options)
        msd3, osd3 = get_state_dict(m3, o3)  # a fresh optimizer: DCP initializes state with a zero step
        sd = {"model": msd3, "optim": osd3}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(m3, o3, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        train(m3, o3, 3, start=3)
        res[key] = all(torch.equal(x, y) for x, y in zip(full(m3), straight))
        res[key + ":replicas"] = _same_replicated_state(o3)
    return res


def _same_replicated_state(opt):
    """Every rank holds bit-identical replicated state (bases, column accumulators, scalars)."""
    ok = True
    for state in opt.state.values():
        for v in state.values():
            t = v.to_local() if hasattr(v, "to_local") and all(p.is_replicate() for p in v.placements) else (
                None if hasattr(v, "to_local") else v)
            if t is None:
                continue
            ref = t.clone()
            dist.broadcast(ref, 0)
            ok &= torch.equal(ref, t)
    return ok


def reshard_load(ckpt_root):
    """Load checkpoints written by 2 ranks into this run's rank count and continue."""
    res = {}
    for name, options in configs()[::2]:
        key = label(name, options)
        path = os.path.join(ckpt_root, key.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "-"))
        m = sharded(base_model())
        o = make(name, m, options)
        train(m, o, 6, split=False)  # reference: uninterrupted, full batch on every rank
        straight = full(m)
        m3 = sharded(base_model())
        o3 = make(name, m3, options)
        msd3, osd3 = get_state_dict(m3, o3)
        sd = {"model": msd3, "optim": osd3}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(m3, o3, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        train(m3, o3, 3, start=3, split=False)
        res[key] = close(full(m3), straight)
    return res


def _bf16_state(model, opt):
    """Every bfloat16 state tensor of the optimizer, whole, in the model's parameter order."""
    out = []
    for p in model.parameters():
        for key, v in sorted(opt.state[p].items()):
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            if v.dtype == torch.bfloat16:
                out.append(v)
    return out


def _equal_fraction(a, b):
    same = sum(int((x.view(torch.int16) == y.view(torch.int16)).sum()) for x, y in zip(a, b))
    return same / max(1, sum(x.numel() for x in a))


def bf16():
    """bfloat16 state with stochastic rounding (the default): a sharded run rounds as one process does.
    Reports, per configuration, the fraction of bf16 state entries bit-identical to one process's with
    the sharded run rounding stochastically (``sr``) and to nearest (``nearest``, the control)."""
    res = {}
    cases = [("AdamWSN", dict(subset_size="auto")), ("AdamWSN", dict(subset_size=16)), ("AdaGradSN", {}),
             ("AdamWSNSM", dict(rank=2, proj_gap=3)), ("AdamWSNSM", dict(rank=2, proj_gap=3, proj="topk")),
             ("SGDSM", dict(rank=2, proj_gap=3, proj="uniform")), ("RMSpropSN", dict(subset_size=None))]
    for name, options in cases:
        options = dict(options, state_dtype="bfloat16")
        ref = base_model()
        ref_opt = make(name, ref, options)
        train(ref, ref_opt, 6, split=False)
        expected = _bf16_state(ref, ref_opt)
        for mode, rounding in (("sr", True), ("nearest", False)):
            m = sharded(base_model())
            o = make(name, m, dict(options, stochastic_rounding=rounding))
            train(m, o, 6)
            res[f"{label(name, options)}:{mode}"] = _equal_fraction(_bf16_state(m, o), expected)
            if rounding:
                res[f"{label(name, options)}:params"] = float(close(full(m), list(ref.parameters())))
    return res


def _train_micro(model, opt, steps, micro, split, in_backward=False, forward_inside=False):
    """``steps`` steps of ``micro`` micro-batches each (the step's batch split in ``micro``); in backward:
    every micro-batch but the last under ``opt.accumulating()`` (its forward too: ``forward_inside``,
    as DDP's no_sync wants, so that those micro-batches are not all-reduced)."""
    for t in range(steps):
        x, y = batch(t)
        if split:
            x, y = x.chunk(WORLD)[RANK], y.chunk(WORLD)[RANK]
        opt.zero_grad()
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            if in_backward and i < micro - 1:
                if forward_inside:
                    with opt.accumulating():
                        (nn.functional.mse_loss(model(xm), ym) / micro).backward()
                    continue
                loss = nn.functional.mse_loss(model(xm), ym) / micro
                with opt.accumulating():
                    loss.backward()
            else:
                (nn.functional.mse_loss(model(xm), ym) / micro).backward()
        opt.step()


def inbackward():
    """Steps in backward under DDP (a communication hook: after the bucket's all-reduce) and FSDP2
    (FSDP2 calls the sharded parameters' post-accumulate-grad hooks after the reduce-scatter) equal
    one process's ordinary steps on the combined batch, with and without gradient accumulation."""
    res = {}
    cases = [("AdamWSN", dict(subset_size="auto")), ("AdamWSNSM", dict(rank=2, proj_gap=3)),
             ("AdaGradSNSM", dict(rank=2, proj_gap=3, proj="topk")), ("RMSpropSN", dict(subset_size=16)),
             ("AdaGO", {})]
    for name, options in cases:
        for micro in (1, 2):
            ref = base_model()
            _train_micro(ref, make(name, ref, options), 4, micro, split=False)
            expected = list(ref.parameters())
            ddp_model = DistributedDataParallel(base_model())
            opt = make(name, ddp_model.module, options)
            opt.step_in_backward(ddp_model)
            _train_micro(ddp_model, opt, 4, micro, split=True, in_backward=True)
            res[f"ddp {label(name, options)} micro={micro}"] = close(list(ddp_model.module.parameters()), expected)
            if micro > 1:  # the forward inside accumulating(): DDP's no_sync skips those all-reduces
                ddp_model = DistributedDataParallel(base_model())
                opt = make(name, ddp_model.module, options)
                opt.step_in_backward(ddp_model)
                _train_micro(ddp_model, opt, 4, micro, split=True, in_backward=True, forward_inside=True)
                res[f"ddp no_sync {label(name, options)} micro={micro}"] = close(
                    list(ddp_model.module.parameters()), expected)
            fsdp_model = sharded(base_model())
            opt = make(name, fsdp_model, options)
            opt.step_in_backward(fsdp_model)
            _train_micro(fsdp_model, opt, 4, micro, split=True, in_backward=True)
            res[f"fsdp2 {label(name, options)} micro={micro}"] = close(full(fsdp_model), expected)
    return res


def unusable():
    """The sharded usable-gradient check agrees on every rank with the check on the whole matrix,
    whichever rank holds the NaN, the inf or the only nonzero entry (and for a rank holding no rows)."""
    from snsm import distributed, subspace

    res = {}
    for rows in (7, 1):  # uneven shards; one row over 2 ranks leaves a rank empty
        for case in ("random", "zero", "one nonzero", "nan", "inf", "-inf"):
            for where in range(rows):
                full_g = torch.randn(rows, 5, generator=torch.Generator().manual_seed(where))
                if case != "random":
                    value = {"zero": 0.0, "one nonzero": 1e-30, "nan": float("nan"), "inf": float("inf"),
                             "-inf": float("-inf")}[case]
                    if case in ("zero", "one nonzero"):
                        full_g.zero_()
                    full_g[where, 3] = value
                p = fully_shard(nn.Linear(5, rows, bias=False), mesh=MESH).weight
                shard = distributed.row_sharding(p)
                local = full_g[shard.start:shard.start + shard.count]
                got = distributed.usable(local, shard)
                agreed = [None] * WORLD
                dist.all_gather_object(agreed, got)
                res[f"{rows} rows, {case} at row {where}"] = (
                    len(set(agreed)) == 1 and got == subspace._usable(full_g)
                    and got == (case in ("random", "one nonzero")))
    return res


def overlap():
    """run_overlapped sums what the steps yield over the ranks before they go on: small requests
    bucketed into one message per dtype, large ones on their own, steps that yield nothing left alone."""
    from snsm import distributed

    big = distributed.BUCKET_BYTES // 4 + 3  # float32 values: just over the bucket limit
    shapes = [(5,), (3, 4), (big,), (2, 7), (1,), (big // 2 + 1, 2)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32, torch.float64, torch.float64]
    seen, ran = {}, []

    def step(i, shape, dtype):
        base = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=dtype).view(shape) * (i + 1)
        t = base * (RANK + 1)
        yield distributed.Reduce(t, MESH.get_group())
        seen[i] = torch.equal(t, base * (WORLD * (WORLD + 1) // 2))

    def quiet():
        ran.append("quiet")
        return
        yield  # a generator that finishes on its first next

    steps = [step(i, s, d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    steps.insert(2, quiet())
    distributed.run_overlapped(steps, meanwhile=lambda: ran.append("meanwhile"))
    res = {f"request {i} {shapes[i]} {dtypes[i]}": seen.get(i, False) for i in range(len(shapes))}
    res["quiet step and meanwhile ran once each"] = sorted(ran) == ["meanwhile", "quiet"]
    return res


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    results = {"parity": parity, "ddp": ddp, "unusable": unusable, "overlap": overlap, "bf16": bf16,
               "inbackward": inbackward}.get(scenario)
    results = results() if results else (dcp_resume(sys.argv[3]) if scenario == "dcp" else reshard_load(sys.argv[3]))
    if RANK == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # results are written: skip interpreter teardown, where gloo's threads have been seen to abort
    sys.stdout.flush()
    os._exit(0)
