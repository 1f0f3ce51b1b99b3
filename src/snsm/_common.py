r"""What every layer of the step shares: dtypes, option checks, the step's scalar math.

The step size of every path is

.. math::

    s_t = \eta_t\, c_t,\qquad c_t = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
    \ \text{(Adam's bias correction, when asked; else 1)}

and a parameter moves as ``W <- W - s_t U`` followed by decoupled weight
decay (:mod:`snsm.weight_decay`). :class:`StepOptions` is the one typed
description of a parameter's step that every path (reference, foreach,
fused, distributed) takes, beside the learning rate, which schedulers change
at every step.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, NamedTuple, Optional

import torch

from .rounding import stochastic_round_
from .subset_norm import SubsetLayout
from .weight_decay import decoupled_weight_decay_

__all__ = [
    "STATE_DTYPES",
    "LOW_PRECISION",
    "StepOptions",
    "Workspace",
    "apply_update_",
    "ema_",
    "caller_stacklevel",
    "check_beta",
    "check_range",
    "check_state_dtype",
    "compute_dtype",
    "scalar_lr",
    "state_dtype",
    "step_count",
    "step_scale",
]

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LOW_PRECISION = (torch.bfloat16, torch.float16)


class StepOptions(NamedTuple):
    """Everything a path needs to step one parameter, but its tensors and the learning rate.

    ``beta1``: momentum EMA coefficient (0: none); ``beta2``: second moment
    (``None``: none; ``1.0``: running sum; else EMA); ``bias_correction``:
    multiply the step by ``c_t``; ``layout``: the Subset-Norm partition
    (:class:`snsm.subset_norm.SubsetLayout`, ``None`` without a second
    moment); ``subspace``: the subspace momentum's description
    (:class:`snsm.subspace.Subspace`, ``None`` for full or no momentum);
    ``warn(key, message)``: how a path reports a once-only problem;
    ``rounding_seed``: write low-precision state back with stochastic
    rounding from this stream (``None``: round to nearest); ``kernel``: what a
    fused kernel needs beyond these, computed once per plan by the fused path.
    """

    beta1: float
    beta2: Optional[float]
    eps: float
    weight_decay: float
    bias_correction: bool
    layout: Optional[SubsetLayout]
    subspace: Any
    warn: Callable[[str, str], None]
    rounding_seed: Optional[int] = None
    kernel: Any = None


def scalar_lr(lr):
    """A learning rate as the steps take it: a number, or a 0-d tensor (torch.optim accepts a
    one-element tensor of any shape, which would otherwise broadcast a parameter to its shape)."""
    return lr.reshape(()) if isinstance(lr, torch.Tensor) and lr.dim() else lr


def check_range(name: str, value, low: float, high: float = math.inf, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and its range unless ``low <= value <= high`` (or ``< high``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element")
        if torch.compiler.is_compiling():  # reading its value would sync and break the graph
            return
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (expected a number)")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok or value != value:  # NaN (math.isnan would not trace under torch.compile)
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value} (allowed range {bound})")


def check_state_dtype(name) -> None:
    """Raise a ``ValueError`` unless ``name`` is ``None`` or a key of :data:`STATE_DTYPES`."""
    if name is not None and name not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {name!r} (allowed: None, {', '.join(STATE_DTYPES)})")


def check_beta(name: str, value, allow_one: bool = False) -> float:
    """Validate a momentum/EMA coefficient: ``[0, 1)``, or ``[0, 1]`` when ``allow_one``."""
    check_range(name, value, 0.0, 1.0, high_open=not allow_one)
    return float(value)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and torch."""
    package = __name__.split(".", 1)[0]
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_globals.get("__name__", "").startswith(package)
                                 or frame.f_globals.get("__name__", "").startswith("torch")):
        frame, level = frame.f_back, level + 1
    return level


def state_dtype(param: torch.Tensor, name: Optional[str]) -> torch.dtype:
    """The dtype of a parameter's state: ``name`` (a key of :data:`STATE_DTYPES`), else float32 for
    bf16/fp16 parameters and the parameter's own dtype otherwise."""
    if name is not None:
        return STATE_DTYPES[name]
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype the step computes in: float32 for bf16/fp16 parameters, else their own."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def step_count(step: torch.Tensor):
    """The step counter as a Python int, or as the tensor itself under ``torch.compile``
    (reading it would break the graph; :func:`step_scale` takes either)."""
    return step if torch.compiler.is_compiling() else int(step.item())


def step_scale(lr, beta1: float, beta2: Optional[float], step, bias_correction: bool):
    """``lr * c_t``: Adam's bias correction ``sqrt(1 - beta2^t) / (1 - beta1^t)`` when asked, else ``lr``.

    ``step`` is an int, or a tensor under ``torch.compile`` (then so is the result).
    """
    if not bias_correction:
        return lr
    if isinstance(step, torch.Tensor):
        return lr * (1.0 - torch.pow(beta2, step)).sqrt() / (1.0 - torch.pow(beta1, step))
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


class Workspace:
    """Compute-dtype views of state tensors, written back to low-precision state at the end.

    With a ``generator``, bfloat16 state is written back with stochastic
    rounding (:func:`snsm.rounding.stochastic_round_`), else rounded to nearest.
    ``rows=(start, total)`` says the tensors handed in are rows
    ``[start, start + len)`` of row-sharded state of ``total`` rows (see
    :meth:`__call__`): their rounding noise is then the same as one process
    draws for those rows.
    """

    def __init__(self, compute: torch.dtype, generator: Optional[torch.Generator] = None):
        self.compute = compute
        self.generator = generator
        self._writeback = []

    def __call__(self, t: torch.Tensor, rows: Optional[tuple] = None) -> torch.Tensor:
        """``t`` in the compute dtype (itself when it is already); ``rows``: ``(start, total)`` when ``t``
        holds rows ``start...`` of a tensor of ``total`` rows that one process would round whole."""
        if t.dtype == self.compute:
            return t
        w = t.to(self.compute)
        self._writeback.append((t, w, rows))
        return w

    def write_back(self) -> None:
        for target, w, rows in self._writeback:
            if self.generator is not None and target.dtype == torch.bfloat16:
                stochastic_round_(target, w, self.generator, rows=rows)
            else:
                target.copy_(w)


def apply_update_(param: torch.Tensor, update: torch.Tensor, lr, scale, weight_decay: float) -> None:
    """``param -= scale * update``, then decoupled weight decay."""
    if isinstance(scale, torch.Tensor):  # a tensor lr (as torch.optim allows) stays on device
        param.sub_((update * scale).to(param.dtype))
    else:
        param.add_(update.to(param.dtype), alpha=-scale)
    decoupled_weight_decay_(param, lr, weight_decay)


def ema_(m: torch.Tensor, x: torch.Tensor, beta1: float) -> torch.Tensor:
    """The momentum rule, in place: ``m <- beta1 m + (1 - beta1) x``."""
    return m.mul_(beta1).add_(x, alpha=1.0 - beta1)
