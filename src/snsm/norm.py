r"""AdaGrad-Norm and RMSprop-Norm: Subset-Norm with a single subset per tensor.

Subset-Norm with ``K = 1`` subset keeps ONE second-moment scalar per tensor:

.. math::

    \text{AdaGrad-Norm:}\quad v_t = v_{t-1} + \lVert G_t \rVert_F^2,
    \qquad
    \text{RMSprop-Norm:}\quad v_t = \alpha v_{t-1} + (1 - \alpha) \lVert G_t \rVert_F^2

and every coordinate of the tensor is divided by ``sqrt(v_t) + eps``. This is
the other extreme from coordinate-wise AdaGrad/RMSprop (``K = d``); Subset-Norm
with ``K ~ sqrt(d)`` sits between them (see :mod:`snsm.subset_norm` and
``python -m snsm.bench.theory`` for the dimension dependence).

Routing follows the rest of the library: in a group whose ``subset_size`` is
``None`` (the coordinate-wise group :func:`snsm.param_groups` builds for
embeddings, norms and biases) the optimizer is plain coordinate-wise
AdaGrad/RMSprop; in every other group (``subset_size="auto"``, the default)
each tensor, matrix or vector, gets one accumulator. Integer ``subset_size``
values are rejected: use :class:`snsm.AdaGradSN` for those.

Because the accumulator is the squared norm of the *whole* tensor, the update
``lr * G / ||G||`` has Frobenius norm at most ``lr``: per coordinate that is
about ``lr / sqrt(numel)``, so useful learning rates are larger than
AdaGrad-SN's (which divides by a row's norm) by about ``sqrt(row count)``.
Tune ``lr`` per model.
"""
from __future__ import annotations

from typing import Iterable, Optional

from .optimizer import Rules
from .variants import AdaGradSN, RMSpropSN

__all__ = ["AdaGradNorm", "RMSpropNorm"]


def _check_subset_size(name: str, group: dict) -> None:
    size = group["subset_size"]
    if size is not None and size != "auto":
        raise ValueError(
            f"Invalid subset_size: {size!r}: {name} keeps one accumulator per tensor "
            "(allowed: 'auto' = one per tensor, None = coordinate-wise; for subsets use the SN variants)"
        )


class _PerTensor:
    """Mixin: the variant's rules with one Subset-Norm subset per tensor (``Rules.per_tensor``),
    unless the group is coordinate-wise."""

    def rules(self, group: dict) -> Rules:
        _check_subset_size(type(self).__name__, group)
        return super().rules(group)._replace(per_tensor=True)


class AdaGradNorm(_PerTensor, AdaGradSN):
    r"""AdaGrad-Norm: one running-sum accumulator per tensor, optional EMA momentum.

    .. math::

        v_t = v_{t-1} + \lVert G_t \rVert_F^2,\qquad
        N_t = \begin{cases} G_t & \mu = 0 \\ m_t = \mu m_{t-1} + (1 - \mu) G_t & \mu > 0 \end{cases}

        W \leftarrow W - \eta_t \frac{N_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    ``momentum`` defaults to 0: classical AdaGrad-Norm (Ward, Wu & Bottou), whose
    state is one scalar per tensor (plus ``step``). ``momentum > 0`` adds a
    parameter-shaped EMA exactly as :class:`snsm.AdaGradSN` does. Groups with
    ``subset_size=None`` are coordinate-wise AdaGrad; see :mod:`snsm.norm`.
    The default ``lr=1.0`` bounds the first update's Frobenius norm by 1.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        momentum: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        subset_size: Optional[str] = "auto",
        state_dtype: Optional[str] = None,
        maximize: bool = False,
    ):
        super().__init__(params, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay,
                         subset_size=subset_size, state_dtype=state_dtype, maximize=maximize)


class RMSpropNorm(_PerTensor, RMSpropSN):
    r"""RMSprop-Norm: one EMA accumulator per tensor, no momentum, no bias correction.

    .. math::

        v_t = \alpha v_{t-1} + (1 - \alpha) \lVert G_t \rVert_F^2,\qquad
        W \leftarrow W - \eta_t \frac{G_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    State: one scalar per tensor (plus ``step``). Groups with
    ``subset_size=None`` are coordinate-wise RMSprop; see :mod:`snsm.norm`.
    Without bias correction the first steps are larger by up to
    ``1 / sqrt(1 - alpha)`` (about 32x at ``alpha=0.999``), as in RMSprop-SN;
    warm the learning rate up.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        alpha: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        subset_size: Optional[str] = "auto",
        state_dtype: Optional[str] = None,
        maximize: bool = False,
    ):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         subset_size=subset_size, state_dtype=state_dtype, maximize=maximize)
