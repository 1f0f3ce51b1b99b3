r"""Decoupled weight decay (Loshchilov & Hutter), applied after the update.

.. math::

    W \leftarrow W - \eta_t \lambda W

as in the reference implementation, which decays the already-updated
parameter (``p -= lr * wd * p`` after ``p -= update``).
"""
from __future__ import annotations

import torch

__all__ = ["decoupled_weight_decay_"]


def decoupled_weight_decay_(param: torch.Tensor, lr, weight_decay: float) -> torch.Tensor:
    """``param -= lr * weight_decay * param`` in place; a no-op when ``weight_decay == 0``."""
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    return param
