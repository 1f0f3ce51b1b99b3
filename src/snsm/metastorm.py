r"""META-STORM: fully adaptive variance-reduced SGD with recursive momentum.

From "META-STORM: Generalized Fully-Adaptive Variance Reduced SGD for
Unbounded Functions" (Tran, Nguyen & Nguyen, arXiv 2209.14853). With the
iterate ``x_t``, the minibatch ``xi_t`` of step ``t`` and ``G(x, xi)`` a
stochastic gradient, each step evaluates the gradient twice on its
minibatch, at the current and at the previous iterate:

.. math::

    G_t = G(x_t, \xi_t),\qquad \tilde G_t = G(x_{t-1}, \xi_t)

    S^a_t = S^a_{t-1} + \lVert G_{t-1} - \tilde G_t \rVert^2
    \ \text{(difference version; norm version: } + \lVert G_t \rVert^2)

    a_t = (1 + S^a_t / a_0^2)^{-2/3}

    d_t = G_t + (1 - a_t)(d_{t-1} - \tilde G_t)\qquad (d_1 = G_1,\ a_1 = 1)

    S^d_t = S^d_{t-1} + \lVert d_t \rVert^2,\qquad
    b_t = (b_0^{1/p} + S^d_t)^p / a_t^{q},\quad q = (1 - p) / 2

    x_{t+1} = x_t - \eta\, d_t / b_t

In the norm version (META-STORM-SG) the sum needs no second gradient, and
the paper's indices are kept: the momentum weight of ``d_t`` is
``a_t = (1 + \sum_{i<t} \lVert G_i \rVert^2 / a_0^2)^{-2/3}`` and the step's
``b_t`` divides by ``a_{t+1}^q`` (the sum through ``G_t``), as the authors'
code does. With ``p = 1/3`` (``q = 1/3``) this is STORM+ (Levy, Kavis & Cevher,
2021), except that STORM+ weighs each ``\lVert d_i \rVert^2`` by its own
``1 / a_{i+1}`` where META-STORM divides the whole sum by the latest ``a``
(the same ``a`` and ``d``; equal steps while ``a`` stays put; otherwise
META-STORM's steps are the shorter ones).

``G_{t-1}`` is the previous step's ``G`` (stored), so a step costs two
forward-backward passes. The momentum weight ``a`` of step ``t`` is the one
this step's minibatch gives, as in the authors' code (the paper's ``b_t``
uses ``a_{t+1}``, which would need a third gradient: the next minibatch at
the current iterate). ``p`` in ``[0.1771, 0.5]`` (difference) or
``[0.25, 0.5]`` (norm), the ranges the authors' code allows.

The sums are kept per ``granularity``: ``"tensor"`` (one ``S^a``, ``S^d``
per parameter tensor, the authors' deep-learning code), ``"coordinate"``
(``v^2`` elementwise: ``a`` and ``b`` per coordinate, the heuristic the paper
reports as competitive in deep learning) or ``"subset"`` (one per Subset-Norm
subset, :mod:`snsm.subset_norm`'s ``subset_size`` rule: the per-coordinate
variant at ``O(sqrt(d))`` accumulator memory, this library's contribution).
``ema=beta`` replaces both running sums by exponential moving averages
(bias-corrected), the paper's other deep-learning heuristic.

**API.** ``opt.step(closure)``: the closure zeroes the gradients, computes the
loss on the current minibatch at the parameters' current values and calls
``backward`` (as ``torch.optim.LBFGS``'s closure); the optimizer calls it at
the current iterate, then, from the second step on, again with the stored
previous iterate swapped into the parameters (and back). It returns the loss
at the current iterate and leaves ``p.grad`` holding ``G_t``.

State per parameter: ``step``; ``d`` (the direction), ``prev`` (``x_{t-1}``),
``prev_grad`` (``G_{t-1}``), all parameter-shaped; ``sum_a``, ``sum_d`` (one
value per tensor, coordinate or subset), in float32 for bf16/fp16 parameters
and the parameter's own dtype otherwise. Three parameter-sized tensors: more
than Adam's two.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch

from ._base import StrictOptimizer
from ._common import check_beta, check_range
from .subset_norm import SubsetLayout, divide_by_root, square_sums, subset_layout, validate_subset_size

__all__ = ["MetaSTORM", "VARIANTS", "GRANULARITIES"]

VARIANTS = ("difference", "norm")
GRANULARITIES = ("tensor", "coordinate", "subset")
P_RANGES = {"difference": (0.1771, 0.5), "norm": (0.25, 0.5)}


class MetaSTORM(StrictOptimizer):
    r"""META-STORM (see :mod:`snsm.metastorm` for the update and the closure API).

    Args:
        params: parameters or groups.
        lr: ``eta``. With ``granularity="tensor"`` and ``p = 1/2`` the first step
            is ``lr d / ||d||``: its Frobenius norm is ``lr`` (as AdaGrad-Norm's), so
            the default 1.0 moves a tensor by at most 1 per step at first.
        a0: scale of the momentum-weight sum, ``(0, inf)``.
        b0: floor of the step denominator, ``(0, inf)``.
        p: exponent of the step denominator (``q = (1 - p) / 2``); range per ``variant``.
        variant: ``"difference"`` (the variance estimate from gradient differences, the
            paper's main algorithm) or ``"norm"`` (from gradient norms, no extra gradient
            in the theory; here the same closure API).
        granularity: ``"tensor"``, ``"coordinate"`` or ``"subset"`` (with ``subset_size``).
        subset_size: the Subset-Norm rule for ``granularity="subset"`` (``"auto"``: one
            subset per row of a tall matrix, per column of a wide one; an int k > 0 a fixed
            length; k < 0 length ``sqrt(numel)/|k|``).
        ema: ``None`` (running sums) or ``beta`` in ``[0, 1)`` (bias-corrected EMAs).
        weight_decay: decoupled, ``x <- (1 - eta lambda) x`` after the step (the authors' code has none).
        maximize: ascend instead of descend.
    """

    CPU_STATE = ("step",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        a0: float = 1.0,
        b0: float = 1e-8,
        p: float = 0.5,
        *,
        variant: str = "difference",
        granularity: str = "tensor",
        subset_size: Any = "auto",
        ema: Optional[float] = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ):
        defaults = dict(lr=lr, a0=a0, b0=b0, p=p, variant=variant, granularity=granularity,
                        subset_size=subset_size, ema=ema, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- validation
    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        for name in ("a0", "b0"):
            value = group[name]
            check_range(name, value, 0.0)
            if value == 0 or math.isinf(value):
                raise ValueError(f"Invalid {name}: {value} (allowed range (0, inf))")
        if group["variant"] not in VARIANTS:
            raise ValueError(f"Invalid variant: {group['variant']!r} (allowed: {', '.join(VARIANTS)})")
        low, high = P_RANGES[group["variant"]]
        check_range("p", group["p"], low, high)
        if group["granularity"] not in GRANULARITIES:
            raise ValueError(f"Invalid granularity: {group['granularity']!r} (allowed: {', '.join(GRANULARITIES)})")
        if group["granularity"] == "subset":
            validate_subset_size(group["subset_size"])
        if group["ema"] is not None:
            check_beta("ema", group["ema"])

    def _layout(self, p: torch.Tensor, group: dict) -> Optional[SubsetLayout]:
        """The partition the sums are kept over (``None``: one value for the whole tensor)."""
        granularity = group["granularity"]
        if granularity == "tensor":
            return None
        return subset_layout(p.shape, None if granularity == "coordinate" else group["subset_size"])

    def state_spec(self, p: torch.Tensor, group: dict) -> dict:
        dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        layout = self._layout(p, group)
        sums = () if layout is None else layout.state_shape
        return {"d": (tuple(p.shape), dtype), "prev": (tuple(p.shape), p.dtype),
                "prev_grad": (tuple(p.shape), dtype), "sum_a": (sums, dtype), "sum_d": (sums, dtype)}

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        for key, (shape, dtype) in self.state_spec(p, group).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    def step_in_backward(self, *args, **kwargs):
        raise RuntimeError("MetaSTORM evaluates its closure twice per step (at the current and the previous "
                           "iterate): its steps cannot run inside one backward")

    # ---------------------------------------------------------------- step
    def prepare_step(self):
        """Every group validated, every gradient and piece of state checked: nothing written."""
        plan = []
        for group in self.param_groups:
            self.validate_group(group)
            params = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.check_grad(p)
                self.check_state(p, group, "were granularity/subset_size changed after the first step?")
                params.append(p)
            plan.append((group, params))
        return plan

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One META-STORM step (see the module doc); ``closure`` is required."""
        if closure is None:
            raise ValueError("MetaSTORM.step needs a closure: one that zeroes the gradients, computes the loss on "
                             "the current minibatch and calls backward (it is also evaluated at the previous iterate)")
        with torch.enable_grad():
            loss = closure()
        plan = self.prepare_step()
        current = {p: p.grad.detach().clone() for _, params in plan for p in params}
        started = [p for _, params in plan for p in params if self.state[p] and int(self.state[p]["step"]) > 0]
        previous = {}
        if started:  # G~ = G(x_{t-1}, xi_t): the same closure with the previous iterate swapped in
            held = {p: p.data for p in started}
            try:
                for p in started:
                    p.data = self.state[p]["prev"]
                with torch.enable_grad():
                    closure()
                for p in started:
                    if p.grad is None:
                        raise RuntimeError("MetaSTORM: the closure gave no gradient at the previous iterate for a "
                                           f"parameter of shape {tuple(p.shape)}")
                    previous[p] = p.grad.detach().clone()
            finally:
                for p, data in held.items():
                    p.data = data
        for group, params in plan:
            for p in params:
                p.grad = current[p]
                if not self.state[p]:
                    self._init_state(p, group)
                self._update(p, group, self.gradient(p, group, current[p]), previous.get(p))
        return loss

    def _sums(self, x: torch.Tensor, layout: Optional[SubsetLayout]) -> torch.Tensor:
        """Squared norms of ``x`` (in the compute dtype) at the sums' granularity."""
        if layout is None:
            return x.square().sum()
        return square_sums(x, layout)

    def _accumulate(self, s: torch.Tensor, x: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """``s`` updated in place with ``x``: a running sum, or an EMA; returns the sum to use
        (the EMA bias-corrected)."""
        beta = group["ema"]
        if beta is None:
            s.add_(x)
        else:
            s.mul_(beta).add_(x, alpha=1.0 - beta)
        return self._total(s, group, step)

    @staticmethod
    def _total(s: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """The sum as of step ``step`` (the EMA bias-corrected), without changing it."""
        beta = group["ema"]
        return s if beta is None else s / (1.0 - beta**step)

    @staticmethod
    def _weight(total: torch.Tensor, a0: float) -> torch.Tensor:
        """The momentum weight ``a = (1 + total / a0^2)^(-2/3)``."""
        return (1.0 + total / a0**2).pow(-2.0 / 3.0)

    def _update(self, p: torch.Tensor, group: dict, grad: torch.Tensor, tilde: Optional[torch.Tensor]) -> None:
        state = self.state[p]
        state["step"] += 1
        step = int(state["step"])
        layout = self._layout(p, group)
        d = state["d"]
        g = grad.to(d.dtype)
        if group["maximize"] and tilde is not None:
            tilde = -tilde
        a0, b0, power = float(group["a0"]), float(group["b0"]), float(group["p"])
        q = (1.0 - power) / 2.0
        if group["variant"] == "norm":
            # META-STORM-SG: the momentum weight of d_t sums the norms before step t, the step's
            # weight (in b_t) those up to and including G_t (the paper's a_t and a_{t+1})
            if tilde is not None:
                a_momentum = self._weight(self._total(state["sum_a"], group, step - 1), a0)
            a = self._weight(self._accumulate(state["sum_a"], self._sums(g, layout), group, step), a0)
        elif tilde is None:  # the first step of the difference version: a_1 = 1
            a = torch.ones((), device=d.device, dtype=d.dtype)
        else:
            a = a_momentum = self._weight(self._accumulate(
                state["sum_a"], self._sums(state["prev_grad"] - tilde.to(d.dtype), layout), group, step), a0)
        if tilde is None:  # d_1 = G_1
            d.copy_(g)
        else:
            # d_t = G_t + (1 - a)(d_{t-1} - G~_t), with (1 - a) broadcast over each subset
            correction = d.sub_(tilde.to(d.dtype))
            d.copy_(torch.addcmul(g, _broadcast(1.0 - a_momentum, correction, layout), correction))
        total_d = self._accumulate(state["sum_d"], self._sums(d, layout), group, step)
        b = (b0 ** (1.0 / power) + total_d).pow(power) / a.pow(q)
        state["prev"].copy_(p)
        state["prev_grad"].copy_(g)
        lr = group["lr"]
        if layout is None:
            p.sub_((d / b).to(p.dtype) * lr)
        else:
            # x -= lr d / b, with b per subset: divide_by_root takes v = b^2 (sqrt(v) + 0 = b)
            p.sub_(divide_by_root(d, b.square(), layout, 0.0).to(p.dtype) * lr)
        if group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])


def _broadcast(values: torch.Tensor, like: torch.Tensor, layout: Optional[SubsetLayout]) -> torch.Tensor:
    """Per-subset ``values`` broadcast to ``like``'s shape (a 0-d tensor for a whole tensor)."""
    if layout is None:
        return values
    if layout.coordinate_wise:
        return values.reshape(like.shape)
    return values.expand(layout.view).reshape(like.shape)
