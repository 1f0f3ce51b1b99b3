r"""Which path steps a parameter, and running one step's plan over every path.

A step goes through one of five paths, all computing the update of
:mod:`snsm._reference` on the same state layout (so checkpoints move
between them):

===============  ==========================================================
``reference``    the for-loop step (:func:`snsm._reference.sn_step_`)
``foreach``      multi-tensor ops for one group's parameters (:mod:`snsm.foreach`)
``fused``        one kernel call for every parameter it takes (:mod:`snsm.fused`)
``sharded``      a row-sharded DTensor's step with small collectives (:mod:`snsm.distributed`)
``local``        a row shard that needs no collective: joins the fused call
===============  ==========================================================

:func:`choose_path` decides, as torch.optim's ``_default_to_fused_or_foreach``
does: the fused kernel where it applies (``fused=None``) or where asked
(``fused=True``, an error naming the reason where it cannot), the
multi-tensor path off CPU (``foreach=None``) or where asked, the reference
path for the rest (subspace momentum off the kernel, low precision,
``torch.compile``, ``fused=foreach=False``). :func:`run_steps` runs a planned
step: all fused and local parameters in one kernel call, overlapped with the
sharded steps' collectives.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import distributed
from . import foreach as foreach_path
from . import fused as fused_path
from ._common import StepOptions, scalar_lr
from ._dtensor import is_dtensor, row_sharding
from ._reference import sn_step_

__all__ = ["PATHS", "choose_path", "prepare_options", "run_steps"]

PATHS = ("reference", "foreach", "fused", "sharded", "local")


def choose_path(param: torch.Tensor, state: dict, options: StepOptions, state_dtype: torch.dtype, *,
                fused: Optional[bool], foreach: Optional[bool], grad: Optional[torch.Tensor] = None) -> str:
    """The path (one of :data:`PATHS`) that steps ``param`` with gradient ``grad`` (default
    ``param.grad``) under a group's ``fused``/``foreach`` options. Raises ``RuntimeError`` for
    ``fused=True`` where no kernel applies, naming why, and ``NotImplementedError`` for DTensor
    layouts other than FSDP2's row sharding."""
    compiling = torch.compiler.is_compiling()
    if is_dtensor(param):
        row_sharding(param)  # raises for layouts the distributed path does not handle
        # the kernel takes float32 state only (state may not exist yet: its dtype decides)
        local = state_dtype == torch.float32 and distributed.steps_locally(param, state, options)
        return "local" if local else "sharded"
    if foreach is not True and fused is not False and not compiling:  # compiled: inductor fuses the reference path
        reason = fused_path.why_not(param, state_dtype, grad)
        if reason is None:
            return "fused"
        if fused:
            raise RuntimeError(f"fused=True, but no fused kernel takes this parameter: {reason}; "
                               "use fused=None to fall back to the other paths")
    # foreach=None: the multi-tensor path off CPU only, as torch.optim (on a CPU it is no faster than the loop)
    wanted = foreach or (foreach is None and param.device.type != "cpu")
    if wanted and not compiling and options.subspace is None and foreach_path.qualifies(param, state_dtype, grad):
        return "foreach"
    return "reference"


def prepare_options(param: torch.Tensor, path: str, options: StepOptions) -> StepOptions:
    """``options`` as ``path`` takes them: the fused kernel's arguments computed once, for a plan."""
    if path in ("fused", "local"):
        return options._replace(kernel=fused_path.kernel_args(param, options))
    return options


def run_steps(steps: List[Tuple], *, scratch: dict) -> None:
    """Run one step of ``(path, param, grad, state, lr, options, batch)`` entries.

    ``batch``: entries of the ``foreach`` path with the same value take one
    multi-tensor step together (one group's parameters). Fused and local
    entries go to one kernel call, which runs while the sharded steps'
    all-reduces are in flight.
    """
    fast, sharded, batches = [], [], {}
    for path, param, grad, state, lr, options, batch in steps:
        lr = scalar_lr(lr)
        if path == "fused":
            fast.append((param, grad, state, lr, options))
        elif path == "local":
            fast.append((*distributed.local_views(param, grad, state), lr, options))
        elif path == "sharded":
            sharded.append(distributed.sharded_step(param, grad, state, lr, options))
        elif path == "foreach":
            batches.setdefault(batch, []).append((param, grad, state, lr, options))
        else:
            sn_step_(param, grad, state, lr, options)
    for entries in batches.values():
        params, grads, states, lrs, options = zip(*entries)
        foreach_path.sn_step_foreach_(list(params), list(grads), list(states), lrs[0], list(options))
    run_fast = (lambda: fused_path.fused_steps_(fast, scratch=scratch)) if fast else None
    if sharded:  # the kernel call runs while the sharded steps' all-reduces are in flight
        distributed.run_overlapped(sharded, meanwhile=run_fast)
    elif run_fast is not None:
        run_fast()
