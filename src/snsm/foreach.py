r"""The multi-tensor path: one step for a list of parameters with ``torch._foreach_*`` ops.

Used for the parameters of a group that the fused kernel does not take (on a
device without one, with ``fused=False``, or with ``foreach=True``), when
they need no subspace and compute in their own dtype. Same update as
:func:`snsm._reference.sn_step_`, one launch per elementwise stage for the
whole list instead of one per parameter:

.. math::

    m \leftarrow m + (1 - \beta_1)(g - m),\quad
    v_S \leftarrow \beta_2 v_S + (1 - \beta_2) \textstyle\sum_{j \in S} g_j^2,\quad
    W \leftarrow (W - \eta c_t\, m / (\sqrt{v_S} + \epsilon))(1 - \eta\lambda)

The subset sums are a per-tensor reduction (their layouts differ); the
denominators broadcast over each subset through views. State layout is the
reference path's, so checkpoints move between paths.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ._common import StepOptions, step_scale
from .subset_norm import SubsetLayout, accumulate_sums_, square_sums
from .weight_decay import decoupled_weight_decay_

__all__ = ["qualifies", "sn_step_foreach_"]


def qualifies(param: torch.Tensor, state_dtype: torch.dtype, grad: Optional[torch.Tensor] = None) -> bool:
    """Whether a parameter can take the multi-tensor path (computes in its own dtype); ``grad``
    defaults to ``param.grad``."""
    grad = param.grad if grad is None else grad
    return (param.dtype in (torch.float32, torch.float64) and state_dtype == param.dtype
            and grad is not None and grad.dtype == param.dtype)


def _frames(t: torch.Tensor, layout: SubsetLayout):
    """``t`` viewed so that a subset is a row (or column) of it, and the shape its denominators broadcast as."""
    if layout.coordinate_wise:
        return t, t.shape
    rows, cols = layout.view
    return t.reshape(rows, cols), ((rows, 1) if layout.dim == 1 else (1, cols))


def sn_step_foreach_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    states: List[dict],
    lr,
    options: List[StepOptions],
) -> None:
    """One step for ``params`` (no subspace momentum; see the module doc). ``options``: one per
    parameter, the same rule coefficients for all (one group's), each with its own layout."""
    o = options[0]
    beta1, beta2 = o.beta1, o.beta2
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1.0)
    nums = grads
    if beta1 > 0:
        nums = [s["exp_avg"] for s in states]
        torch._foreach_lerp_(nums, grads, 1.0 - beta1)
    if beta2 is not None:
        vs = [s["exp_avg_sq"] for s in states]
        layouts = [opt.layout for opt in options]
        accumulate_sums_(vs, [square_sums(g, layout).view(v.shape) for g, layout, v in zip(grads, layouts, vs)], beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, o.eps)
        framed = [_frames(n, layout) for n, layout in zip(nums, layouts)]
        updates = torch._foreach_div([f for f, _ in framed], [d.view(s) for d, (_, s) in zip(denoms, framed)])
        updates = [u.view(p.shape) for u, p in zip(updates, params)]  # fresh tensors: scaled in place
    scales = [step_scale(lr, beta1, beta2, int(s.item()), o.bias_correction) for s in steps]
    if any(isinstance(c, torch.Tensor) for c in scales):  # a tensor lr
        updates = [n * c for n, c in zip(updates if beta2 is not None else nums, scales)]
    elif beta2 is None:
        updates = torch._foreach_mul(nums, scales)  # nums is the momentum state or the gradients: not in place
    else:
        torch._foreach_mul_(updates, scales)
    torch._foreach_sub_(params, updates)
    decoupled_weight_decay_(params, lr, o.weight_decay)
