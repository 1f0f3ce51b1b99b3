r"""The for-loop reference path: one parameter at a time, the readable definition of the step.

Every other path (:mod:`snsm.foreach`, :mod:`snsm.fused`,
:mod:`snsm.distributed`) computes the same update with fewer passes, and is
tested against this one. With gradient ``G``, step ``t``:

.. math::

    N_t = \begin{cases}
        G_t & \beta_1 = 0 \\
        m_t = \beta_1 m_{t-1} + (1-\beta_1) G_t & \text{full momentum} \\
        \text{back}(M_t) + G_t - \text{back}(R_t),\ R_t = P(G_t),\
        M_t = \beta_1 M_{t-1} + (1 - \beta_1) R_t & \text{subspace momentum}
    \end{cases}

    v_t = \beta_2 v_{t-1} + (1 - \beta_2) \textstyle\sum_{j \in S} G_{t,j}^2
    \ \text{(or the running sum; absent for SGD)}

    W \leftarrow W - \eta_t c_t\, N_t / (\sqrt{v_t} + \epsilon);\quad
    W \leftarrow (1 - \eta_t\lambda) W

Each rule is one function of a shared module: the momentum EMA
(:func:`snsm._common.ema_`), the projector and its refresh
(:mod:`snsm.subspace`), the Subset-Norm accumulator and denominator
(:mod:`snsm.subset_norm`), the step size ``eta_t c_t``
(:func:`snsm._common.step_scale`) and weight decay (:mod:`snsm.weight_decay`).
"""
from __future__ import annotations

import torch

from . import subspace as sm
from ._common import StepOptions, Workspace, apply_update_, compute_dtype, ema_, step_count, step_scale
from .rounding import rounding_generator
from .subset_norm import accumulate_, divide_by_root

__all__ = ["sn_step_"]


def sn_step_(param: torch.Tensor, grad: torch.Tensor, state: dict, lr, options: StepOptions) -> None:
    """One step for one parameter (see the module doc).

    ``options.rounding_seed``: write low-precision state back with stochastic
    rounding, from a random stream fixed by this seed and the step (so a
    resumed run draws the same bits).
    """
    o = options
    compute = compute_dtype(param)
    state["step"] += 1
    step = step_count(state["step"])
    g = grad.to(compute)
    generator = None if o.rounding_seed is None else rounding_generator(o.rounding_seed, state["step"], g.device)
    working = Workspace(compute, generator)

    subspace = o.subspace
    if subspace is not None:
        is_tall = subspace.is_tall
        gm = g.reshape(subspace.shape)
        a = sm.tall(gm, is_tall)
        mom = sm.tall(working(state["exp_avg"]), is_tall)
        if isinstance(step, torch.Tensor) and subspace.proj in sm.TRACEABLE_PROJECTIONS:
            refreshed = sm.refresh_projector_traced(state, gm, mom, subspace, step)
        else:
            refreshed = sm.refresh_projector(state, gm, mom, subspace, step, o.warn)
        p = state["proj"]
        r = sm.project(a, p)
        ema_(mom, r, o.beta1)
        num = sm.tall(sm.numerator(a, mom, r, p), is_tall).reshape(param.shape)
        if subspace.refresh == "reference":
            if isinstance(refreshed, torch.Tensor):
                mom.masked_fill_(refreshed, 0.0)
            elif refreshed:
                mom.zero_()
    elif o.beta1 > 0:
        num = ema_(working(state["exp_avg"]), g, o.beta1)
    else:
        num = g

    if o.beta2 is not None:
        v = working(state["exp_avg_sq"])
        accumulate_(v, g, o.layout, o.beta2)
        update = divide_by_root(num, v, o.layout, o.eps)
    else:
        update = num

    apply_update_(param, update, lr, step_scale(lr, o.beta1, o.beta2, step, o.bias_correction), o.weight_decay)
    working.write_back()
