r"""The fast path: the same step as :func:`snsm.optimizer.sn_step_`, fewer passes.

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
from ._kernels import cpu_kernel, triton_sn
from .distributed import is_dtensor
from .subset_norm import SubsetLayout

__all__ = ["supports", "kernel_for", "kernel_args", "sn_step_fused_", "fused_steps_"]

_EMPTY = torch.empty(0)


def kernel_for(device: torch.device):
    """The fused kernel for tensors on ``device``: the C++ module on CPU, the Triton kernels on CUDA
    (both expose ``sn_step`` and ``sn_accumulate`` with one signature; the C++ one also
    ``fused_step``), or ``None``."""
    if device.type == "cpu":
        return cpu_kernel()
    if device.type == "cuda" and triton_sn.available():
        return triton_sn
    return None


def supports(param: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether a fused kernel handles this parameter (float32 parameter, grad and state; CPU or CUDA)."""
    return (
        not is_dtensor(param)
        and param.dtype == torch.float32
        and state_dtype == torch.float32
        and param.is_contiguous()
        and param.grad is not None
        and param.grad.dtype == torch.float32
        and kernel_for(param.device) is not None
    )


def _kernel_layout(layout: Optional[SubsetLayout]):
    """(kind, row_len) for the kernel: 0 coordinate-wise, 1 contiguous rows, 2 columns."""
    if layout is None or layout.coordinate_wise:
        return 0, 0
    rows, cols = layout.view
    return (1, cols) if layout.dim == 1 else (2, cols)


def aligned(layout: Optional[SubsetLayout]) -> bool:
    """Whether subsets are the rows of the tall frame ("auto"), or absent: the subspace step then
    needs no numerator (see the module doc)."""
    return layout is None or (not layout.coordinate_wise and layout.target == 0)


def _one_pass(k, proj, exp_avg, v, beta2, layout) -> bool:
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


def _second_moment(beta2):
    if beta2 is None:
        return 1.0, 0.0
    return (1.0, 1.0) if beta2 == 1.0 else (beta2, 1.0 - beta2)


def sn_step_fused_(
    param, grad, state, *, lr, beta1, beta2, eps, weight_decay, bias_correction, layout, subspace, warn, scratch
) -> None:
    """Fast path of :func:`snsm.optimizer.sn_step_` (same arguments, plus a scratch-buffer dict)."""
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                   layout=layout, subspace=subspace, warn=warn)
    fused_steps_([(param, grad, state, options, lr)], scratch=scratch)


class KernelArgs(NamedTuple):
    """What a parameter's fused step hands the kernel besides its tensors and the step's
    coefficients: fixed by the parameter's plan, so the optimizer computes it once
    (:func:`kernel_args`) and keeps it with the plan's options under ``"kernel"``."""

    kernel: object  # kernel_for(param.device)
    kind: int  # kernel layout: 0 coordinate-wise, 1 contiguous rows, 2 columns
    row_len: int
    momentum: bool  # a full-size momentum tensor (beta1 > 0 and no subspace)
    v_decay: float
    v_gain: float


def kernel_args(param: torch.Tensor, options: dict) -> KernelArgs:
    """:class:`KernelArgs` of ``param`` under its step options (those of :func:`snsm.optimizer.sn_step_`)."""
    kind, row_len = _kernel_layout(options["layout"])
    v_decay, v_gain = _second_moment(options["beta2"])
    momentum = options["beta1"] > 0 and options["subspace"] is None
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
    ``(param, grad, state, step options but lr, lr)``, from any groups.

    As little Python per parameter as it takes: what the plan fixes comes
    precomputed (``options["kernel"]``, :func:`kernel_args`); projector
    refreshes and subspace steps the one-pass kernel does not take run here;
    everything else goes to the kernel in one call (:func:`snsm._kernels`
    ``fused_step``), where memory-bound tensors and compute-bound subspace
    matrices share the threads, and which moves the step counters too (a
    kernel without that entry point: one multi-tensor add after its passes).
    """
    from .optimizer import _refresh_projector, refresh_due, step_scale

    scales = {}  # (lr, beta1, beta2, bias_correction, step) -> lr * bias correction
    batches = {}  # kernel -> _Batch
    zero_after = []  # momentum that refresh="reference" zeroes once the step has read it
    for param, grad, state, o, lr in items:
        ka = o.get("kernel") or kernel_args(param, o)
        k = ka.kernel
        lr = float(lr)
        beta1, beta2 = o["beta1"], o["beta2"]
        step = int(state["step"].item()) + 1  # this step's count; the counter itself moves with the kernel call
        key = (lr, beta1, beta2, o["bias_correction"], step)
        scale = scales.get(key)
        if scale is None:
            scale = scales[key] = step_scale(lr, beta1, beta2, step, o["bias_correction"])
        decay = 1.0 - lr * o["weight_decay"]
        v_decay, v_gain = ka.v_decay, ka.v_gain
        v = state["exp_avg_sq"] if beta2 is not None else _EMPTY
        subspace = o["subspace"]
        g = grad if grad.is_contiguous() else grad.contiguous()
        coef = (beta1, v_decay, v_gain, o["eps"], scale, decay)
        batch = batches.get(k)
        if batch is None:
            batch = batches[k] = _Batch()
        batch.steps.append(state["step"])
        if subspace is None:
            whole = batch.whole
            whole[0].append(param)
            whole[1].append(g)
            whole[2].append(state["exp_avg"] if ka.momentum else _EMPTY)
            whole[3].append(v)
            whole[4].append(ka.kind)
            whole[5].append(ka.row_len)
            whole[6].extend(coef)
        elif _one_pass(k, state["proj"], state["exp_avg"], v, beta2, o["layout"]):
            # views only on a refresh step (each costs microseconds, and most steps need none)
            if refresh_due(state, subspace, step) and _refresh_projector(
                    state, g.view(subspace.shape), sm.tall(state["exp_avg"], subspace.is_tall), subspace, step,
                    o["warn"]) and subspace.refresh == "reference":
                zero_after.append(state["exp_avg"])
            for column, value in zip(batch.subspace, (param, g, state["exp_avg"], state["proj"], v)):
                column.append(value)
            batch.subspace[5].extend((*subspace.shape, subspace.is_tall))
            batch.subspace[6].extend(coef)
        else:
            _subspace_step(k, param, g, state, step, scale, decay, v, ka.kind, ka.row_len, v_decay, v_gain,
                           beta1=beta1, beta2=beta2, eps=o["eps"], layout=o["layout"], subspace=subspace,
                           warn=o["warn"], scratch=scratch)
    for k, batch in batches.items():
        batch.run(k)
    for mom in zero_after:
        mom.zero_()


def _subspace_step(k, param, g, state, step, scale, decay, v, kind, row_len, v_decay, v_gain, *, beta1, beta2, eps,
                   layout, subspace, warn, scratch) -> None:
    """One parameter's subspace-momentum step the one-pass kernel does not take (a row selection, subsets
    across rows, a kernel without the one-pass step); its step counter moves with the batch's kernel call."""
    from .optimizer import _refresh_projector

    is_tall = subspace.is_tall
    gm = g.view(subspace.shape)
    pm = param.view(subspace.shape)
    a = sm.tall(gm, is_tall)
    mom = sm.tall(state["exp_avg"], is_tall)
    refreshed = _refresh_projector(state, gm, mom, subspace, step, warn)
    p = state["proj"]
    r = sm.project(a, p)
    mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
    if beta2 is None or aligned(layout):
        # the kernel's pass first: it updates v and applies (W - s A / D) * decay; then the rank-r
        # part with per-row denominators of the tall frame ("auto": rows of a tall G, columns of a
        # wide one), scaled by the decay it now comes after
        k.sn_step(param, g, _EMPTY, v, kind, row_len, 0.0, v_decay, v_gain, True, eps, scale, decay)
        x = torch.sub(mom, r, out=r)
        if beta2 is not None:
            d = sm.tall(v.view(layout.state_shape), is_tall).sqrt().add_(eps)
            x.div_(d if p.is_floating_point() else d.index_select(0, p))
        alpha = -scale * decay
        if p.is_floating_point():
            if is_tall:
                pm.addmm_(x, p.T, alpha=alpha)
            else:
                pm.addmm_(p, x.T, alpha=alpha)
        else:
            pm.index_add_(0 if is_tall else 1, p, x if is_tall else x.T, alpha=alpha)
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
        if beta2 is not None:  # the sums come from the gradient, the step from the numerator
            k.sn_accumulate(g, v, kind, row_len, v_decay, v_gain)
        k.sn_step(param, buf, _EMPTY, v, kind, row_len, 0.0, v_decay, v_gain, False, eps, scale, decay)
    if refreshed and subspace.refresh == "reference":
        mom.zero_()
