r"""The named optimizers: each a configuration of :class:`~snsm.optimizer.SubsetNormOptimizer`.

Common notation: gradient ``G_t``, learning rate ``eta_t``, Subset-Norm
accumulator ``v`` (one value per subset, broadcast over it; see
:mod:`snsm.subset_norm`), subspace momentum ``M`` with projector ``P`` (see
:mod:`snsm.subspace`), decoupled weight decay ``lambda`` applied after the
update. Every option may be set per parameter group; :func:`snsm.param_groups`
builds the paper's grouping (Subset-Norm / Subspace-Momentum on linear
weights, coordinate-wise elsewhere).

Subset-Norm sums squared gradients over a subset rather than averaging them,
so its learning rates are about 10x Adam's (the authors' LLaMA-60M settings:
Adam 5e-3, AdamW-SN and AdamW-SNSM 5e-2, RMSprop-SN 1e-2, AdaGrad-SNSM 1.0).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

from ._common import check_beta
from .optimizer import Rules, SubsetNormOptimizer

__all__ = ["AdamWSN", "AdamWSNSM", "AdaGradSN", "AdaGradSNSM", "RMSpropSN", "SGDSM"]

SubsetSize = Union[str, int, None]


def _betas(group: dict) -> Tuple[float, float]:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    return check_beta("betas[0]", betas[0]), check_beta("betas[1]", betas[1], allow_one=True)


class AdamWSN(SubsetNormOptimizer):
    r"""AdamW with a Subset-Norm second moment.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) G_t

        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \textstyle\sum_{j \in S} G_{t,j}^2
        \quad\text{(one } v \text{ per subset } S)

        W \leftarrow W - \eta_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    ``subset_size="auto"`` (one subset per row of a tall matrix, per column of
    a wide one) keeps ``max(m, n)`` second-moment values instead of ``m n``;
    ``None`` makes a group plain AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        subset_size: SubsetSize = "auto",
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      subset_size=subset_size, state_dtype=state_dtype,
                                      stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize))

    def rules(self, group: dict) -> Rules:
        beta1, beta2 = _betas(group)
        if beta2 == 1.0:
            raise ValueError("Invalid betas[1]: 1.0 (allowed range [0, 1); for a running sum use AdaGradSN)")
        return Rules(beta1, beta2, bias_correction=True, subspace=False)


class AdamWSNSM(AdamWSN):
    r"""AdamW with Subset-Norm step sizes and Subspace-Momentum.

    For a matrix with ``rank=r`` the momentum lives in an r-dimensional
    subspace (projector ``P``, recomputed every ``proj_gap`` steps) and the
    rest of the gradient takes a plain step:

    .. math::

        R_t = P(G_t),\qquad M_t = \beta_1 M_{t-1} + (1 - \beta_1) R_t

        N_t = P^{-}(M_t) + \bigl(G_t - P^{-}(R_t)\bigr)

        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \textstyle\sum_{j \in S} G_{t,j}^2

        W \leftarrow W - \eta_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{N_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    with ``P^-`` the back-projection. ``rank=None`` (or a vector, or
    ``rank >= min(m, n)``, with a warning) gives full momentum: AdamW-SN.
    ``proj`` is one of ``svd``, ``randomized``, ``srht``, ``topk``,
    ``uniform``; ``refresh`` says what a new basis does to the momentum
    (``reset``, ``transport`` or ``reference``; see :mod:`snsm.subspace`).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        subset_size: SubsetSize = "auto",
        rank: Optional[int] = 128,
        proj: str = "svd",
        proj_gap: int = 200,
        refresh: str = "transport",
        stagger: Optional[bool] = None,
        seed: int = 0,
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        SubsetNormOptimizer.__init__(
            self, params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, subset_size=subset_size, rank=rank,
                 proj=proj, proj_gap=proj_gap, refresh=refresh, stagger=stagger, seed=seed, state_dtype=state_dtype,
                 stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize),
        )

    def rules(self, group: dict) -> Rules:
        return super().rules(group)._replace(subspace=True)


class AdaGradSN(SubsetNormOptimizer):
    r"""AdaGrad with a Subset-Norm accumulator (a running sum) and EMA momentum.

    .. math::

        m_t = \mu m_{t-1} + (1 - \mu) G_t,\qquad
        v_t = v_{t-1} + \textstyle\sum_{j \in S} G_{t,j}^2

        W \leftarrow W - \eta_t \frac{m_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    ``momentum`` is an EMA coefficient (Adam's beta1, not ``torch.optim.SGD``'s
    heavy ball); ``momentum=0`` is AdaGrad-SN without momentum. No bias
    correction. With one subset per tensor this is AdaGrad-Norm.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-1,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        subset_size: SubsetSize = "auto",
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay,
                                      subset_size=subset_size, state_dtype=state_dtype,
                                      stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize))

    def rules(self, group: dict) -> Rules:
        return Rules(check_beta("momentum", group["momentum"]), 1.0, bias_correction=False, subspace=False)


class AdaGradSNSM(AdaGradSN):
    r"""AdaGrad-SN with Subspace-Momentum.

    .. math::

        R_t = P(G_t),\qquad M_t = \mu M_{t-1} + (1 - \mu) R_t,\qquad
        N_t = P^{-}(M_t) + \bigl(G_t - P^{-}(R_t)\bigr)

        v_t = v_{t-1} + \textstyle\sum_{j \in S} G_{t,j}^2,\qquad
        W \leftarrow W - \eta_t \frac{N_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    Subspace options as in :class:`AdamWSNSM`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-1,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        subset_size: SubsetSize = "auto",
        rank: Optional[int] = 128,
        proj: str = "svd",
        proj_gap: int = 200,
        refresh: str = "transport",
        stagger: Optional[bool] = None,
        seed: int = 0,
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        SubsetNormOptimizer.__init__(
            self, params,
            dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, subset_size=subset_size, rank=rank,
                 proj=proj, proj_gap=proj_gap, refresh=refresh, stagger=stagger, seed=seed, state_dtype=state_dtype,
                 stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize),
        )

    def rules(self, group: dict) -> Rules:
        return super().rules(group)._replace(subspace=True)


class RMSpropSN(SubsetNormOptimizer):
    r"""RMSprop with a Subset-Norm second moment; no momentum, no bias correction.

    .. math::

        v_t = \alpha v_{t-1} + (1 - \alpha) \textstyle\sum_{j \in S} G_{t,j}^2,\qquad
        W \leftarrow W - \eta_t \frac{G_t}{\sqrt{v_t} + \epsilon},\qquad W \leftarrow W - \eta_t \lambda W

    The leanest of the family: state is one value per subset.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        alpha: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        subset_size: SubsetSize = "auto",
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      subset_size=subset_size, state_dtype=state_dtype,
                                      stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize))

    def rules(self, group: dict) -> Rules:
        return Rules(0.0, check_beta("alpha", group["alpha"]), bias_correction=False, subspace=False)


class SGDSM(SubsetNormOptimizer):
    r"""SGD with Subspace-Momentum: no adaptive step size.

    .. math::

        R_t = P(G_t),\qquad M_t = \mu M_{t-1} + (1 - \mu) R_t

        W \leftarrow W - \eta_t \bigl(P^{-}(M_t) + G_t - P^{-}(R_t)\bigr),\qquad W \leftarrow W - \eta_t \lambda W

    Groups with ``rank=None`` get full EMA momentum ``m_t = mu m_{t-1} + (1 - mu) G_t``.
    There is no second moment, so ``subset_size`` must be ``None``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        rank: Optional[int] = 128,
        proj: str = "svd",
        proj_gap: int = 200,
        refresh: str = "transport",
        stagger: Optional[bool] = None,
        seed: int = 0,
        state_dtype: Optional[str] = None,
        stochastic_rounding: bool = True,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, subset_size=None, rank=rank, proj=proj,
                 proj_gap=proj_gap, refresh=refresh, stagger=stagger, seed=seed, state_dtype=state_dtype,
                 stochastic_rounding=stochastic_rounding, fused=fused, foreach=foreach, maximize=maximize),
        )

    def rules(self, group: dict) -> Rules:
        if group["subset_size"] is not None:
            raise ValueError(
                f"Invalid subset_size: {group['subset_size']!r}: SGDSM keeps no second moment (allowed: None)"
            )
        return Rules(check_beta("momentum", group["momentum"]), None, bias_correction=False, subspace=True)
