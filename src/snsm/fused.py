r"""The fast path: the same step as :func:`snsm._reference.sn_step_`, fewer passes.

Full momentum / no momentum: one fused kernel pass per tensor
(:mod:`snsm._kernels`: C++ on CPU, Triton on CUDA), reading ``p, g, m`` and writing ``p, m`` once; the
Subset-Norm sums are taken row by row while the row is in cache.

Subspace momentum never materializes the numerator when the subsets line up
with the projection (``subset_size="auto"``: one step size per row of the
tall frame). With ``D`` the per-row denominator ``sqrt(v) + eps``:

.. math::

    \frac{A + (M - R) Q^T}{D} = \frac{A}{D} + \Bigl(\frac{M - R}{D}\Bigr) Q^T

and every row of the tall frame is independent of the others. On CPU, with a
dense basis, the kernel's one-pass step therefore takes the whole step block by
block of rows: ``R = A Q`` for the block, ``v``, ``M``, ``X = (M - R) / D``,
``W <- (W - s A / D) decay`` and the rank-r ``W -= s decay X Q^T``, while the
block is in cache (``G`` and ``W`` read once, ``W`` written once; the two small
GEMMs run on the kernel's own AVX2/FMA tiles where the build targets them, a
wide frame's block transposed into cache first, else on the BLAS torch ships).
Elsewhere (CUDA, a row selection) it is the kernel's pass for ``A / D`` (which
also updates ``v``), one small ``(M - R) / D`` (``M x r``) and one rank-r
``addmm_`` straight into the parameter (for a row selection, an ``index_add_``
of ``r`` rows instead). Other partitions build the numerator once in a scratch
buffer and apply it with the kernel. State layout is identical to the
reference path, so checkpoints move between paths.

A step makes one kernel call for all of it (:func:`fused_steps_`, every group
at once): the parameters taken whole and the one-pass subspace matrices go
together to the C++ ``fused_step``, which runs the memory-bound passes and the
GEMM blocks side by side on the threads; only projector refreshes and the
subspace steps it does not take run in Python.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import subspace as sm
from ._common import StepOptions, ema_, step_scale
from ._dtensor import is_dtensor
from ._kernels import kernel_for, unavailable_reason
from .subset_norm import aligned, kernel_layout, second_moment_coefficients
from .weight_decay import decay_factor

__all__ = ["EMPTY", "KernelArgs", "supports", "why_not", "kernel_args", "one_pass", "fused_steps_", "subspace_correction_"]

#: the kernels' stand-in for a tensor a step does not have (no momentum, no second moment)
EMPTY = torch.empty(0)


def why_not(param: torch.Tensor, state_dtype: torch.dtype, grad: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why no fused kernel takes this parameter, in words (``None``: one does). It takes float32
    parameters, gradients (``grad``, default ``param.grad``) and state, contiguous, on CPU (the
    C++ kernel) or CUDA (Triton)."""
    grad = param.grad if grad is None else grad
    if is_dtensor(param):
        return "the parameter is a DTensor (the distributed path takes it)"
    if param.dtype != torch.float32:
        return f"the parameter is {param.dtype} (the kernel takes float32)"
    if state_dtype != torch.float32:
        return f"its state is {state_dtype} (the kernel takes float32 state; state_dtype=None gives it)"
    if not param.is_contiguous():
        return "the parameter is not contiguous"
    if grad is not None and grad.dtype != torch.float32:
        return f"its gradient is {grad.dtype} (the kernel takes float32)"
    if kernel_for(param.device) is None:
        if param.device.type == "cpu":
            return f"the CPU kernel is unavailable: {unavailable_reason() or 'not built'}"
        if param.device.type == "cuda":
            return "the CUDA kernel needs Triton, which is not installed"
        return f"there is no kernel for {param.device.type} tensors"
    return None


def supports(param: torch.Tensor, state_dtype: torch.dtype, grad: Optional[torch.Tensor] = None) -> bool:
    """Whether a fused kernel handles this parameter (see :func:`why_not`)."""
    return why_not(param, state_dtype, grad) is None


def one_pass(k, proj, exp_avg, v, beta2, layout) -> bool:
    """Whether the kernel's one-pass subspace step takes this one: a dense basis, subsets that
    are the rows of the tall frame (or no second moment), contiguous state and a BLAS to call."""
    return (
        getattr(k, "sm_step_available", None) is not None
        and k.sm_step_available()
        and proj.is_floating_point()
        and (beta2 is None or aligned(layout))
        and exp_avg.is_contiguous()
        and proj.is_contiguous()
        and v.is_contiguous()
    )


class KernelArgs(NamedTuple):
    """What a parameter's fused step hands the kernel besides its tensors and the step's
    coefficients: fixed by the parameter's plan, so it is computed once (:func:`kernel_args`)
    and kept in the plan's :class:`~snsm._common.StepOptions` (``kernel``)."""

    kernel: object  # kernel_for(param.device)
    kind: int  # kernel layout: 0 coordinate-wise, 1 contiguous rows, 2 columns
    row_len: int
    momentum: bool  # a full-size momentum tensor (beta1 > 0 and no subspace)
    v_decay: float
    v_gain: float


def kernel_args(param: torch.Tensor, options: StepOptions) -> KernelArgs:
    """:class:`KernelArgs` of ``param`` under its step options."""
    kind, row_len = kernel_layout(options.layout)
    v_decay, v_gain = second_moment_coefficients(options.beta2)
    momentum = options.beta1 > 0 and options.subspace is None
    return KernelArgs(kernel_for(param.device), kind, row_len, momentum, v_decay, v_gain)


class _Batch:
    """One kernel's arguments for a step, as lists: whole tensors (``sn_step``) and subspace matrices
    taken in one pass, with six coefficients each
    (beta1, v_decay, v_gain, eps, step size, decay), and the step counters to move."""

    def __init__(self):
        self.whole = ([], [], [], [], [], [], [])  # p, g, m, v, layout, row_len, coefficients
        self.subspace = ([], [], [], [], [], [], [])  # p, g, exp_avg, proj, v, (m, n, tall), coefficients
        self.steps = []

    def run(self, k) -> None:
        p, g, m, v, kinds, row_lens, coef = self.whole
        if hasattr(k, "fused_step"):
            sp, sg, smom, sq, sv, shape, scoef = self.subspace
            k.fused_step(p, g, m, v, kinds, row_lens, coef, sp, sg, smom, sq, sv, shape, scoef, self.steps)
            return
        for i in range(len(p)):  # a kernel without the one-region entry point (Triton): tensor by tensor
            b1, vd, vg, eps, scale, decay = coef[6 * i: 6 * i + 6]
            k.sn_step(p[i], g[i], m[i], v[i], kinds[i], row_lens[i], b1, vd, vg, True, eps, scale, decay)
        torch._foreach_add_(self.steps, 1.0)


def fused_steps_(items, *, scratch) -> None:
    """The fast path for every parameter of a step that takes it: ``items`` are
    ``(param, grad, state, lr, StepOptions)``, from any groups.

    As little Python per parameter as it takes: what the plan fixes comes
    precomputed (``options.kernel``, :func:`kernel_args`); projector
    refreshes and subspace steps the one-pass kernel does not take run here;
    everything else goes to the kernel in one call (:func:`snsm._kernels`
    ``fused_step``), where memory-bound tensors and compute-bound subspace
    matrices share the threads, and which moves the step counters too (a
    kernel without that entry point: one multi-tensor add after its passes).
    """
    scales = {}  # (lr, beta1, beta2, bias_correction, step) -> lr * bias correction
    batches = {}  # kernel -> _Batch
    zero_after = []  # momentum that refresh="reference" zeroes once the step has read it
    for param, grad, state, lr, o in items:
        ka = o.kernel or kernel_args(param, o)
        k = ka.kernel
        lr = float(lr)
        beta1, beta2 = o.beta1, o.beta2
        step = int(state["step"].item()) + 1  # this step's count; the counter itself moves with the kernel call
        key = (lr, beta1, beta2, o.bias_correction, step)
        scale = scales.get(key)
        if scale is None:
            scale = scales[key] = step_scale(lr, beta1, beta2, step, o.bias_correction)
        decay = decay_factor(lr, o.weight_decay)
        v = state["exp_avg_sq"] if beta2 is not None else EMPTY
        subspace = o.subspace
        g = grad if grad.is_contiguous() else grad.contiguous()
        coef = (beta1, ka.v_decay, ka.v_gain, o.eps, scale, decay)
        batch = batches.get(k)
        if batch is None:
            batch = batches[k] = _Batch()
        batch.steps.append(state["step"])
        if subspace is None:
            whole = batch.whole
            whole[0].append(param)
            whole[1].append(g)
            whole[2].append(state["exp_avg"] if ka.momentum else EMPTY)
            whole[3].append(v)
            whole[4].append(ka.kind)
            whole[5].append(ka.row_len)
            whole[6].extend(coef)
        elif one_pass(k, state["proj"], state["exp_avg"], v, beta2, o.layout):
            # views only on a refresh step (each costs microseconds, and most steps need none)
            if sm.refresh_due(state, subspace, step) and sm.refresh_projector(
                    state, g.view(subspace.shape), sm.tall(state["exp_avg"], subspace.is_tall), subspace, step,
                    o.warn) and subspace.refresh == "reference":
                zero_after.append(state["exp_avg"])
            for column, value in zip(batch.subspace, (param, g, state["exp_avg"], state["proj"], v)):
                column.append(value)
            batch.subspace[5].extend((*subspace.shape, subspace.is_tall))
            batch.subspace[6].extend(coef)
        else:
            _subspace_step(k, ka, param, g, state, step, scale, decay, v, o, scratch)
    for k, batch in batches.items():
        batch.run(k)
    for mom in zero_after:
        mom.zero_()


def subspace_correction_(pm, mom, r, q, d, alpha, is_tall) -> None:
    r"""The rank-r part of a subspace step, after the kernel's pass ``W <- (W - s A / D) decay``:
    ``W += alpha back((M - R) / D)`` (``alpha = -s decay``).

    ``mom`` and ``r`` are in the tall frame (``R`` is overwritten), ``q`` the
    basis (``N x r``) or the selected rows, ``d`` the tall frame's per-row
    denominators ``sqrt(v) + eps`` (``None`` without a second moment) and
    ``pm`` the parameter's matrix view.
    """
    x = torch.sub(mom, r, out=r)
    if d is not None:
        x.div_(d if q.is_floating_point() else d.index_select(0, q))
    if q.is_floating_point():
        if is_tall:
            pm.addmm_(x, q.T, alpha=alpha)
        else:
            pm.addmm_(q, x.T, alpha=alpha)
    else:
        pm.index_add_(0 if is_tall else 1, q, x if is_tall else x.T, alpha=alpha)


def _subspace_step(k, ka: KernelArgs, param, g, state, step, scale, decay, v, o: StepOptions, scratch) -> None:
    """One parameter's subspace-momentum step the one-pass kernel does not take (a row selection, subsets
    across rows, a kernel without the one-pass step); its step counter moves with the batch's kernel call."""
    subspace = o.subspace
    is_tall = subspace.is_tall
    gm = g.view(subspace.shape)
    pm = param.view(subspace.shape)
    a = sm.tall(gm, is_tall)
    mom = sm.tall(state["exp_avg"], is_tall)
    refreshed = sm.refresh_projector(state, gm, mom, subspace, step, o.warn)
    p = state["proj"]
    r = sm.project(a, p)
    ema_(mom, r, o.beta1)
    if o.beta2 is None or aligned(o.layout):
        # the kernel's pass first: it updates v and applies (W - s A / D) * decay; then the rank-r
        # part with per-row denominators of the tall frame ("auto": rows of a tall G, columns of a
        # wide one), scaled by the decay it now comes after
        k.sn_step(param, g, EMPTY, v, ka.kind, ka.row_len, 0.0, ka.v_decay, ka.v_gain, True, o.eps, scale, decay)
        d = None if o.beta2 is None else sm.tall(v.view(o.layout.state_shape), is_tall).sqrt().add_(o.eps)
        subspace_correction_(pm, mom, r, p, d, -scale * decay, is_tall)
    else:
        key = (tuple(param.shape), param.dtype)
        buf = scratch.get(key)
        if buf is None:
            buf = scratch[key] = torch.empty_like(param)
        num = sm.tall(buf.view(subspace.shape), is_tall)
        if p.is_floating_point():
            torch.addmm(a, mom - r, p.T, out=num)
        else:
            num.copy_(a).index_copy_(0, p, mom)
        if o.beta2 is not None:  # the sums come from the gradient, the step from the numerator
            k.sn_accumulate(g, v, ka.kind, ka.row_len, ka.v_decay, ka.v_gain)
        k.sn_step(param, buf, EMPTY, v, ka.kind, ka.row_len, 0.0, ka.v_decay, ka.v_gain, False, o.eps, scale, decay)
    if refreshed and subspace.refresh == "reference":
        mom.zero_()
