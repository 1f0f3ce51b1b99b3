"""A job's checkpoint: what it holds, how it is written and how a resumed job reads it back.

``checkpoint.pt`` (written atomically) holds the job's identity (the settings that must match to
resume), the model, the optimizer state (tensors and plain numbers only: it loads with
``torch.load(weights_only=True)``, see :func:`export_state`), the scheduler, the data position, the
RNG states, the run's accumulators (the curve, the training losses, the timings, ...) and, for an
adaptive-batch job, the batch-size controller. Under FSDP every rank writes its shards of the model
and the optimizer state to a ``torch.distributed.checkpoint`` directory ``dcp-step<k>``
(:func:`save_sharded`) and ``checkpoint.pt`` names it, written only after the directory is complete.

Below :mod:`snsm.bench.train`; imports only :mod:`snsm.bench.fileio` and :class:`snsm.bench.BenchError`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import BenchError
from .fileio import atomic_torch_save

IDENTITY_KEYS = ("optimizer", "lr", "model", "vocab_size", "seq_len", "batch_size", "micro_batch", "steps",
                 "eval_every", "eval_seqs", "warmup_frac", "min_lr_ratio", "clip", "rank", "proj_gap", "seed")
OPTIONAL_IDENTITY_KEYS = ("aux_lr", "batch_schedule", "max_batch_size", "batch_eta", "nproc", "parallel")  # when set


def job_identity(job: dict) -> dict:
    """The settings of ``job`` that a checkpoint must have been written with to be resumed."""
    ident = {k: job[k] for k in IDENTITY_KEYS}
    ident.update({k: job[k] for k in OPTIONAL_IDENTITY_KEYS if job.get(k) is not None})
    return ident


# --- optimizer state with tensors and plain numbers only -----------------------------------------

def _galore_projector_cls():
    try:
        from galore_torch.galore_projector import GaLoreProjector
        return GaLoreProjector
    except Exception:
        return None


def export_state(opt) -> dict:
    """``opt.state_dict()`` with any non-tensor object (GaLore's projector) replaced by its tensors,
    so the checkpoint loads with ``torch.load(weights_only=True)``."""
    sd = opt.state_dict()
    proj_cls = _galore_projector_cls()
    if proj_cls is None:
        return sd
    state = {}
    for k, s in sd["state"].items():
        s = dict(s)
        p = s.pop("projector", None)
        if isinstance(p, proj_cls):
            if p.ortho_matrix is not None:
                s["projector_ortho_matrix"] = p.ortho_matrix
        elif p is not None:
            s["projector"] = p
        state[k] = s
    return {"state": state, "param_groups": sd["param_groups"]}


def import_state(opt, sd: dict) -> None:
    """Inverse of :func:`export_state`."""
    opt.load_state_dict(sd)
    proj_cls = _galore_projector_cls()
    if proj_cls is None:
        return
    for group in opt.param_groups:
        if "rank" not in group or "update_proj_gap" not in group:
            continue
        for p in group["params"]:
            s = opt.state.get(p)
            if s is not None and "projector_ortho_matrix" in s:
                proj = proj_cls(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                proj_type=group["proj_type"])
                proj.ortho_matrix = s.pop("projector_ortho_matrix")
                s["projector"] = proj


# --- FSDP: every rank's shards through torch.distributed.checkpoint ------------------------------

def save_sharded(model, opt, path: Path) -> None:
    """Every rank writes its shards of the model and optimizer state to the DCP directory ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(model, opt, path: Path) -> None:
    """Inverse of :func:`save_sharded` (a fresh optimizer gets its state created first, by DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


# --- the job's checkpoint -------------------------------------------------------------------------

def save(path: Path, job: dict, model, opt, sched, run: dict, device, batch_ctl=None, *, sharded: bool = False,
         rank0: bool = True) -> None:
    """Write ``path`` (``checkpoint.pt``) at step ``run["step"]``; every rank calls it (under FSDP every
    rank writes its shards first), rank 0 writes the file. ``model``: the unwrapped model."""
    import torch

    cuda = device.type == "cuda"
    if sharded:  # every rank writes its shards; checkpoint.pt names the directory once it is complete
        states = {"dcp": f"dcp-step{run['step']}"}
        save_sharded(model, opt, path.parent / states["dcp"])
    elif rank0:
        states = {"model": model.state_dict(), "optimizer": export_state(opt)}
    if not rank0:
        return
    atomic_torch_save({
        "job": job_identity(job), **states,
        "scheduler": sched.state_dict(), "data": {"step": run["step"], "seed": job["seed"]},
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None},
        "run": run, **({"batch": batch_ctl.state_dict()} if batch_ctl is not None else {}),
    }, path)
    if sharded:
        for old in path.parent.glob("dcp-step*"):
            if old.name != states["dcp"]:
                shutil.rmtree(old, ignore_errors=True)


def restore(path: Path, job: dict, model, opt, sched, run: dict, device, batch_ctl=None) -> None:
    """Inverse of :func:`save`: loads the model, the optimizer, the scheduler, the RNG states and the
    controller, and updates ``run`` with the saved accumulators (keys the checkpoint lacks keep their
    values in ``run``). Refuses a checkpoint written by another configuration."""
    import torch

    try:
        ck = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:  # cut short (a full disk), overwritten, not a checkpoint at all
        first = (str(e).splitlines() or [""])[0][:160]
        raise BenchError(f"{path} is not a readable checkpoint (corrupt or cut short; delete it to rerun the job "
                         f"from the start): {type(e).__name__}: {first}") from e
    if not isinstance(ck, dict) or "job" not in ck:
        raise BenchError(f"{path} is not a benchmark checkpoint (delete it to rerun the job from the start)")
    if ck["job"] != job_identity(job):
        raise BenchError(f"{path} was written by a different configuration; use a new --out")
    if "dcp" in ck:
        load_sharded(model, opt, path.parent / ck["dcp"])
    else:
        model.load_state_dict(ck["model"])
        import_state(opt, ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda" and ck["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    run.update(ck["run"])
    if batch_ctl is not None:
        batch_ctl.load_state_dict(ck["batch"])
    assert ck["data"]["step"] == run["step"]
