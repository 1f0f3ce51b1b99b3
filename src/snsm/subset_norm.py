r"""Subset-Norm: one adaptive step size per subset of coordinates.

Partition the ``d`` coordinates of a parameter into ``K`` disjoint subsets
``S_1 .. S_K`` and keep a single second-moment accumulator per subset:

.. math::

    \text{EMA } (\beta_2 < 1):\quad v_i \leftarrow \beta_2 v_i + (1 - \beta_2) \sum_{j \in S_i} g_j^2

    \text{sum } (\beta_2 = 1):\quad v_i \leftarrow v_i + \sum_{j \in S_i} g_j^2

and divide every coordinate ``j`` of subset ``i`` by ``sqrt(v_i) + eps``.
``K = d`` is Adam/AdaGrad, ``K = 1`` is AdaGrad-Norm; ``K ~ sqrt(d)`` cuts the
second moment from O(d) to O(sqrt d) memory.

The accumulator holds the *sum* of squares over a subset, not the mean, which
is why Subset-Norm learning rates are about 10x Adam's.

Partition rules (``subset_size``):

``"auto"``
    the shape rule. A matrix ``m x n`` (any tensor with ``ndim >= 2`` is read
    as ``(shape[0], prod(shape[1:]))``) gets one subset per row when
    ``m >= n`` (state ``m x 1``), else one per column (state ``1 x n``): memory
    ``max(m, n)``. Vectors and scalars stay coordinate-wise.
``k > 0``
    flatten row-major; subset length = the largest divisor of ``d`` that is
    ``<= k``; contiguous chunks. State ``(d / length) x 1``.
``k < 0``
    target length ``int(sqrt(d) / |k|)``, then the divisor rule above.
``None``
    coordinate-wise: state shaped like the parameter (plain Adam/AdaGrad).

A ``d`` with no divisor near the target degrades (a prime ``d`` gives length
1, i.e. coordinate-wise); :func:`subset_layout` reports that in
``SubsetLayout.degraded`` so the optimizer can warn once.

Everything here is a pure function of tensors; no optimizer state object.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch

__all__ = [
    "SubsetLayout",
    "subset_layout",
    "validate_subset_size",
    "largest_divisor_at_most",
    "square_sums",
    "accumulate_",
    "divide_by_root",
    "accumulate_sums_",
    "second_moment_coefficients",
    "aligned",
    "kernel_layout",
]

SubsetSize = Union[str, int, None]


class SubsetLayout(NamedTuple):
    """How a parameter's coordinates are grouped.

    ``view``: the shape the parameter is viewed as before reducing (``None`` =
    coordinate-wise, no reduction); ``dim``: the dimension of ``view`` summed
    over; ``state_shape``: the shape of the accumulator; ``target``/``length``:
    the requested and actual subset length for the divisor rule (else 0);
    ``degraded``: the divisor rule fell far below its target.
    """

    view: Optional[tuple]
    dim: Optional[int]
    state_shape: tuple
    length: int = 0
    target: int = 0

    @property
    def degraded(self) -> bool:
        return self.target > 0 and 2 * self.length < self.target

    @property
    def coordinate_wise(self) -> bool:
        return self.view is None


def validate_subset_size(subset_size: SubsetSize) -> None:
    """Raise a specific error unless ``subset_size`` is ``"auto"``, ``None`` or a non-zero int."""
    if subset_size is None or subset_size == "auto":
        return
    if isinstance(subset_size, bool) or not isinstance(subset_size, int):
        raise ValueError(
            f"Invalid subset_size: {subset_size!r} (allowed: 'auto', None, an int k > 0 for a "
            "fixed subset length, or an int k < 0 for length int(sqrt(numel)/|k|))"
        )
    if subset_size == 0:
        raise ValueError("Invalid subset_size: 0 (allowed: 'auto', None, or a non-zero int)")


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is ``<= k`` (at least 1)."""
    k = max(1, min(k, n))
    for length in range(k, 0, -1):
        if n % length == 0:
            return length
    return 1


def _matrix_shape(shape: torch.Size) -> tuple:
    return (shape[0], math.prod(shape[1:]))


def subset_layout(shape: torch.Size, subset_size: SubsetSize) -> SubsetLayout:
    """The partition of a tensor of ``shape`` under ``subset_size`` (see module doc)."""
    validate_subset_size(subset_size)
    if torch.compiler.is_compiling():  # dynamo traces through the cache anyway (and warns)
        return _subset_layout.__wrapped__(torch.Size(shape), subset_size)
    return _subset_layout(torch.Size(shape), subset_size)


@functools.lru_cache(maxsize=4096)  # called for every parameter at every step
def _subset_layout(shape: torch.Size, subset_size: SubsetSize) -> SubsetLayout:
    numel = shape.numel()
    if subset_size is None or numel == 0:
        return SubsetLayout(None, None, tuple(shape))
    if subset_size == "auto":
        if len(shape) < 2:
            return SubsetLayout(None, None, tuple(shape))
        m, n = _matrix_shape(shape)
        if m >= n:
            return SubsetLayout((m, n), 1, (m, 1))
        return SubsetLayout((m, n), 0, (1, n))
    target = subset_size if subset_size > 0 else int(math.sqrt(numel) / -subset_size)
    target = max(1, target)
    length = largest_divisor_at_most(numel, target)
    count = numel // length
    return SubsetLayout((count, length), 1, (count, 1), length, min(target, numel))


def square_sums(grad: torch.Tensor, layout: SubsetLayout) -> torch.Tensor:
    """``sum_{j in S_i} g_j^2`` for every subset, shaped ``layout.state_shape``."""
    if layout.coordinate_wise:
        return grad * grad
    g = grad.reshape(layout.view)
    return (g * g).sum(dim=layout.dim, keepdim=True)


def second_moment_coefficients(beta2: Optional[float]) -> tuple:
    """``(decay, gain)`` of the accumulator rule ``v <- decay * v + gain * sums``: ``(beta2, 1 - beta2)``
    for an EMA, ``(1, 1)`` for AdaGrad's running sum (``beta2 == 1``), ``(1, 0)`` without a second moment."""
    if beta2 is None:
        return 1.0, 0.0
    return (1.0, 1.0) if beta2 == 1.0 else (beta2, 1.0 - beta2)


def accumulate_sums_(v, sums, beta2: float):
    """``v <- beta2 v + (1 - beta2) sums`` (EMA), or ``v <- v + sums`` (``beta2 == 1``), in place.

    ``v`` and ``sums`` are tensors, or lists of tensors (one multi-tensor op for them all).
    """
    decay, gain = second_moment_coefficients(beta2)
    if isinstance(v, (list, tuple)):
        if decay != 1.0:
            torch._foreach_mul_(v, decay)
        if gain != 1.0:
            torch._foreach_add_(v, sums, alpha=gain)
        else:
            torch._foreach_add_(v, sums)
        return v
    if decay != 1.0:
        v.mul_(decay)
    return v.add_(sums, alpha=gain) if gain != 1.0 else v.add_(sums)


def accumulate_(v: torch.Tensor, grad: torch.Tensor, layout: SubsetLayout, beta2: float) -> torch.Tensor:
    """Update the accumulator in place with ``grad``'s subset sums (:func:`accumulate_sums_`)."""
    return accumulate_sums_(v, square_sums(grad, layout).to(v.dtype), beta2)


def aligned(layout: Optional[SubsetLayout]) -> bool:
    """Whether subsets are the rows of a matrix's tall frame (``"auto"``), or absent: a subspace
    step then needs no numerator (see :mod:`snsm.fused`)."""
    return layout is None or (not layout.coordinate_wise and layout.target == 0)


def kernel_layout(layout: Optional[SubsetLayout]) -> tuple:
    """``(kind, row_len)`` as the fused kernels take a layout: kind 0 coordinate-wise (or none),
    1 contiguous rows of ``row_len``, 2 columns of a matrix ``row_len`` wide."""
    if layout is None or layout.coordinate_wise:
        return 0, 0
    rows, cols = layout.view
    return (1, cols) if layout.dim == 1 else (2, cols)


def divide_by_root(numerator: torch.Tensor, v: torch.Tensor, layout: SubsetLayout, eps: float) -> torch.Tensor:
    """``numerator / (sqrt(v) + eps)``, each subset's value broadcast over its coordinates.

    ``numerator`` is parameter-shaped (or any view with the same numel); the
    result has ``numerator``'s shape.
    """
    denom = v.sqrt().add_(eps)
    if layout.coordinate_wise:
        return numerator / denom.reshape(numerator.shape)
    return (numerator.reshape(layout.view) / denom).reshape(numerator.shape)
