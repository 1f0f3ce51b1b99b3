r"""Decoupled weight decay (Loshchilov & Hutter), applied after the update.

.. math::

    W \leftarrow W - \eta_t \lambda W = (1 - \eta_t \lambda) W

as in the reference implementation, which decays the already-updated
parameter (``p -= lr * wd * p`` after ``p -= update``). The fused kernels
take the factor :func:`decay_factor` and apply it in the same pass.
"""
from __future__ import annotations

from typing import List, Union

import torch

__all__ = ["decay_factor", "decoupled_weight_decay_"]


def decay_factor(lr, weight_decay: float):
    """``1 - lr * weight_decay``: what the parameter is multiplied by after its update."""
    return 1.0 - lr * weight_decay


def decoupled_weight_decay_(param: Union[torch.Tensor, List[torch.Tensor]], lr, weight_decay: float):
    """``param *= 1 - lr * weight_decay`` in place (a list: one multi-tensor op); a no-op when
    ``weight_decay == 0``."""
    if weight_decay != 0:
        if isinstance(param, (list, tuple)):
            torch._foreach_mul_(param, decay_factor(lr, weight_decay))
        else:
            param.mul_(decay_factor(lr, weight_decay))
    return param
