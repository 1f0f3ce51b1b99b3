r"""Steps inside backward: each parameter steps as soon as its gradient is final, and frees it.

:meth:`snsm._base.StrictOptimizer.step_in_backward` returns an
:class:`InBackward` handle. Without a model, or with an FSDP2 model, it
registers a post-accumulate-grad hook on every parameter
(``Tensor.register_post_accumulate_grad_hook``; FSDP2 calls those of its
sharded parameters once their reduce-scatter has produced the gradient):
when the hook fires, the parameter takes its step and its ``.grad`` is set
to ``None``, so at most a few gradients are alive at any time instead of all
of them. With a ``DistributedDataParallel`` model it registers a DDP
communication hook instead: a bucket's parameters step once the bucket's
all-reduce has completed, on the averaged gradient (DDP keeps its gradient
buckets, so this saves no gradient memory; it keeps the loop's shape and
overlaps the steps with the remaining backward).

Gradient accumulation: ``with opt.accumulating(): loss.backward()`` for every
micro-batch but the last, as DDP's ``no_sync``; gradients accumulate as usual
(under FSDP2 without reduce-scatter when the model was given; under DDP
without all-reduce when the micro-batch's forward runs inside the block too,
as DDP's ``no_sync`` requires, else with one), and the last micro-batch's
backward steps and frees.

Gradient clipping cannot be global inside backward: a global norm needs
every gradient before any step. The handle offers

* ``clip="tensor"``: each gradient clipped to norm ``max_norm`` on its own,
  ``g <- g min(1, max_norm / (||g|| + 1e-6))``;
* ``clip="previous"``: every gradient scaled by the global clip factor of the
  previous step, ``min(1, max_norm / (||G_{t-1}|| + 1e-6))``, with
  ``||G_{t-1}||`` summed as the previous step's parameters stepped (the first
  step is not clipped). A step ends when a parameter steps a second time or
  ``opt.step()`` is called.

``handle.remove()`` returns to ordinary steps (under DDP the communication
hook stays registered, as DDP allows one, and only all-reduces).
``handle.state_dict()`` / ``load_state_dict()`` carry the ``"previous"``
factor across a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist

from ._dtensor import is_dtensor

__all__ = ["InBackward", "CLIP_MODES"]

CLIP_MODES = (None, "tensor", "previous")


def _is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _is_fsdp2(model) -> bool:
    return model is not None and hasattr(model, "set_requires_gradient_sync") and not _is_ddp(model)


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """``||grad||^2`` of this rank's values (a DTensor: its local shard), as a float32 0-d tensor."""
    local = grad.to_local() if is_dtensor(grad) else grad
    return local.float().square().sum()


class InBackward:
    """The handle :meth:`~snsm._base.StrictOptimizer.step_in_backward` returns (see the module doc).

    ``opt`` must provide ``step_parameter(p, grad)`` (one parameter's step, validated first),
    ``owns(p)``, ``parameters()`` and an ``accumulating_now`` flag.
    """

    def __init__(self, opt, model=None, clip: Optional[str] = None, max_norm: float = 1.0):
        if clip not in CLIP_MODES:
            raise ValueError(f"Invalid clip: {clip!r} (allowed: None, 'tensor', 'previous')")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0 \
                or math.isinf(max_norm):
            raise ValueError(f"Invalid max_norm: {max_norm!r} (allowed range (0, inf))")
        self.opt = opt
        self.model = model
        self.clip = clip
        self.max_norm = float(max_norm)
        self.active = True
        self._handles = []
        self._hooked = set()
        self._seen = set()  # parameters stepped in the current step (clip="previous")
        self._sq = None  # their summed squared norms
        self._sharded = False
        self._factor = None  # the previous step's clip factor
        if _is_ddp(model):
            model.register_comm_hook(None, self._ddp_hook)
        else:
            self.hook_new_parameters()

    # ---------------------------------------------------------------- registration
    def hook_new_parameters(self) -> None:
        """Hook the optimizer's parameters that have no hook yet (after ``add_param_group``)."""
        if _is_ddp(self.model) or not self.active:
            return
        for p in self.opt.parameters():
            if p not in self._hooked and p.requires_grad:
                self._hooked.add(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def remove(self) -> None:
        """Back to ordinary steps: the hooks are removed (DDP's communication hook only all-reduces)."""
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self.opt.forget_in_backward(self)

    # ---------------------------------------------------------------- accumulation
    @contextlib.contextmanager
    def no_sync(self):
        """The model's own way to skip gradient communication, where it was given one."""
        model = self.model
        if _is_ddp(model):
            with model.no_sync():
                yield
        elif _is_fsdp2(model):
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    # ---------------------------------------------------------------- the steps
    def _hook(self, p: torch.Tensor) -> None:
        if not self.active or self.opt.accumulating_now or p.grad is None:
            return
        self.step(p, p.grad)
        p.grad = None

    def _ddp_hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        fut = default_hooks.allreduce_hook(process_group, bucket)
        if not self.active or self.opt.accumulating_now:  # a micro-batch whose forward ran outside no_sync
            return fut

        def step_bucket(fut):
            buffer = fut.value()[0] if isinstance(fut.value(), list) else fut.value()
            for grad, p in zip(bucket.gradients(), bucket.parameters()):
                if self.opt.owns(p):
                    self.step(p, grad)
            return buffer

        return fut.then(step_bucket)

    def step(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Clip ``grad`` as the handle says, then step ``p`` with it."""
        with torch.no_grad():
            self.opt.step_parameter(p, self._clipped(p, grad))

    def _clipped(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return grad
        if self.clip == "tensor":
            norm = grad.float().norm()
            if is_dtensor(norm):
                norm = norm.full_tensor()
            return grad * (self.max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)
        if p in self._seen:
            self.end_step()
        self._seen.add(p)
        sq = _squared_norm(grad)
        self._sq = sq if self._sq is None else self._sq + sq
        self._sharded |= is_dtensor(grad)
        if self._factor is None:
            return grad
        return grad * self._factor.to(device=grad.device, dtype=grad.dtype)

    def state_dict(self) -> dict:
        """What a resumed run needs of the handle: the ``clip="previous"`` factor of the last closed
        step, as a Python float (``None``: none yet). Save it beside the optimizer's state."""
        return {"factor": None if self._factor is None else float(self._factor)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s factor, so the first step after a resume is clipped as the
        uninterrupted run's was."""
        factor = state.get("factor")
        self._factor = None if factor is None else torch.tensor(float(factor), dtype=torch.float32)

    def end_step(self) -> None:
        """Close the current step for ``clip="previous"``: its global norm sets the next step's factor."""
        if self.clip != "previous" or self._sq is None:
            return
        total = self._sq.clone()
        if self._sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)  # row shards: every rank's part of the squared norm
        self._factor = (self.max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        self._seen.clear()
        self._sq = None
        self._sharded = False
