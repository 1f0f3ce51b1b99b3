r"""Subspace-Momentum: momentum in a rank-r subspace, plain SGD in its complement.

For a gradient ``G`` of shape ``m x n`` the rules work on the *tall frame*
``A = G`` when ``m >= n`` and ``A = G^T`` otherwise, so ``A`` is ``M x N`` with
``M >= N``. A projector ``P`` is either

* a **dense basis** ``Q`` (``N x r``, orthonormal columns, float32) spanning
  (an estimate of) the top-r right singular subspace of ``A``:
  ``R = A Q`` (``M x r``) and ``back(X) = X Q^T``; or
* a **row selection** ``idx`` (``r`` int64 indices into the ``M`` rows of
  ``A``): ``R = A[idx]`` (``r x N``) and ``back(X)`` scatters ``X`` into those
  rows.

The momentum lives in the coordinates of ``R`` and the update numerator adds
the orthogonal complement of the gradient back:

.. math::

    M_t = \beta_1 M_{t-1} + (1 - \beta_1) R_t,\qquad
    N_t = \text{back}(M_t) + (A_t - \text{back}(R_t)) = A_t + \text{back}(M_t - R_t)

(the second form costs one rank-r matmul for a dense basis). Stored momentum
is kept in the gradient's orientation: for a wide ``G`` it is ``M_A^T``. With
``G`` tall a dense basis gives momentum ``m x r``; wide ``r x n``; a row
selection gives ``r x n`` (tall) or ``m x r`` (wide).

Projector builders (all take the current gradient, return ``None`` when the
gradient carries no usable direction, i.e. is all zero or non-finite, or the
factorization fails):

``svd``         top-r singular vectors of ``G``, computed in float32 (for ``G`` of
                2^16 entries or more, as eigenvectors of the Gram matrix
                ``A^T A`` of the tall frame: same subspace, 1.5-5x faster;
                on CPU the kernel's half-products Gram, :func:`_gram`).
``randomized``  Halko-Martinsson-Tropp range finder: Gaussian sketch with
                oversampling, power iterations, then the top singular vectors
                of the small projected matrix; O(M N (r + p)) instead of a
                full SVD.
``srht``        subsampled randomized Hadamard sketch ``Y = (S H D A)^T`` of
                width 2r (no Gaussian matrix): the 2r sampled rows of ``H``
                (:func:`hadamard_rows`, only the first M columns, as ``A`` is
                zero-padded to a power of two) times ``D A``, one O(M N r)
                matmul; orthonormalized by QR, then the r directions of that
                span carrying most of ``A``'s energy: a real orthonormal
                projection biased towards the gradient's top directions.
``topk``        the r rows of ``A`` with the largest norm.
``uniform``     r rows of ``A`` chosen uniformly at random.

Refresh policies (what happens to ``M`` when the basis changes):
``reset`` zeroes it before the refresh step's update (what the paper
describes); ``transport`` carries it into the new basis,
``M <- M Q_old^T Q_new`` (dense) or the rows both selections share (rows);
``reference`` reproduces the authors' code, which reads the old momentum in
the new basis for the refresh step and zeroes it only afterwards.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._kernels import cpu_kernel

__all__ = [
    "Subspace",
    "validate_options",
    "refresh_due",
    "refresh_projector",
    "refresh_projector_traced",
    "TRACEABLE_PROJECTIONS",
    "PROJECTIONS",
    "DENSE_PROJECTIONS",
    "REFRESH_POLICIES",
    "tall",
    "fwht",
    "hadamard_rows",
    "build_projector",
    "raw_projector",
    "fallback_projector",
    "project",
    "numerator",
    "transport",
    "momentum_shape",
    "projector_shape",
    "next_seed",
]

DENSE_PROJECTIONS = ("svd", "randomized", "srht")
PROJECTIONS = DENSE_PROJECTIONS + ("topk", "uniform")
REFRESH_POLICIES = ("reset", "transport", "reference")

#: ``svd`` of a matrix of at least this many entries goes through its Gram matrix (measured on 2 CPU
#: threads: 256 x 256 9 -> 6 ms, 688 x 256 11 -> 6 ms, 256 x 688 25 -> 6 ms, 32000 x 256 138 -> 27 ms);
#: smaller ones, the golden cases among them, take the SVD itself
GRAM_MIN_ELEMENTS = 1 << 16

#: randomized range finder settings (Halko et al. recommend p ~ 5-10, q ~ 1-2)
OVERSAMPLE = 8
POWER_ITERS = 2


class Subspace(NamedTuple):
    """How one matrix keeps its momentum in a subspace.

    ``shape``: the ``(m, n)`` matrix view; ``rank``: ``r``; ``proj``: the
    projector kind (:data:`PROJECTIONS`); ``gap``: steps between refreshes;
    ``refresh``: the policy for the momentum when the basis changes
    (:data:`REFRESH_POLICIES`); ``offset``: a refresh is due when
    ``(step + offset) % gap == 0`` (staggered matrices get different offsets).
    """

    shape: tuple  # (m, n) matrix view
    rank: int
    proj: str
    gap: int
    refresh: str
    offset: int = 0

    @property
    def is_tall(self) -> bool:
        return self.shape[0] >= self.shape[1]


def validate_options(rank, proj_gap, refresh, proj: Optional[str] = None) -> None:
    """Raise a ``ValueError`` naming the option unless ``rank`` (``None`` or an int >= 1),
    ``proj_gap`` (an int >= 1), ``refresh`` and ``proj`` (when given) are valid."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"Invalid rank: {rank!r} (allowed: None for full momentum, or an int >= 1)")
    if proj is not None and proj not in PROJECTIONS:
        raise ValueError(f"Invalid proj: {proj!r} (allowed: {', '.join(PROJECTIONS)})")
    if isinstance(proj_gap, bool) or not isinstance(proj_gap, int) or proj_gap < 1:
        raise ValueError(f"Invalid proj_gap: {proj_gap!r} (allowed: an int >= 1)")
    if refresh not in REFRESH_POLICIES:
        raise ValueError(f"Invalid refresh: {refresh!r} (allowed: {', '.join(REFRESH_POLICIES)})")


def tall(x: torch.Tensor, is_tall: bool) -> torch.Tensor:
    """The tall-frame view of a gradient-oriented matrix (a transpose view when wide)."""
    return x if is_tall else x.T


def momentum_shape(m: int, n: int, rank: int, proj: str) -> tuple:
    """Shape of the subspace momentum for an ``m x n`` matrix (gradient orientation)."""
    dense = proj in DENSE_PROJECTIONS
    if m >= n:
        return (m, rank) if dense else (rank, n)
    return (rank, n) if dense else (m, rank)


def projector_shape(m: int, n: int, rank: int, proj: str) -> tuple:
    """Shape of the projector: ``N x r`` basis for dense kinds, ``r`` indices otherwise."""
    return (min(m, n), rank) if proj in DENSE_PROJECTIONS else (rank,)


def next_seed(seed: int) -> int:
    """One step of a 63-bit linear congruential sequence (the projector RNG stream)."""
    return (seed * 6364136223846793005 + 1442695040888963407) % (1 << 63)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along dim 0 (length a power of two).

    ``fwht(x) = H x / sqrt(L)`` with ``H`` the Sylvester Hadamard matrix, in
    ``log2(L)`` butterfly passes: O(L log L) per column. Its own inverse.
    """
    length = x.shape[0]
    if length & (length - 1):
        raise ValueError(f"fwht needs a power-of-two length along dim 0, got {length}")
    rest = x.shape[1:]
    y = x.reshape(length, -1)
    h = 1
    while h < length:
        y = y.view(length // (2 * h), 2, h, -1)
        a, b = y[:, 0], y[:, 1]
        y = torch.stack((a + b, a - b), dim=1)
        h *= 2
    return y.reshape(length, *rest) / math.sqrt(length)


def _usable(a: torch.Tensor) -> bool:
    """Finite and not all zero, from one reduction without a temporary (the smallest and the
    largest entry: a NaN anywhere makes both NaN, an inf makes one of them infinite)."""
    lo, hi = torch.aminmax(a)
    return bool(torch.isfinite(lo) & torch.isfinite(hi) & ((lo != 0) | (hi != 0)))


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _svd_basis(g: torch.Tensor, rank: int) -> torch.Tensor:
    if g.numel() >= GRAM_MIN_ELEMENTS:
        return _gram_basis(tall(g, g.shape[0] >= g.shape[1]), rank)
    # the SVD of G itself, not of the tall view, so the singular vectors' signs
    # match the reference implementation's (they matter for `refresh="reference"`)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    if g.shape[0] >= g.shape[1]:
        return vh[:rank].T.contiguous()
    return u[:, :rank].contiguous()


def _gram_basis(a: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-r right singular vectors of a tall ``A`` as eigenvectors of ``A^T A``.

    One ``N x N`` float32 product (a compute-bound matmul) and a float64
    ``eigh`` of that small matrix, instead of a full SVD of ``A``: 5x faster on
    a 32000 x 256 output head, 1.5-4x on a transformer block's matrices. Directions whose singular value is below
    ``sqrt(float32 eps) * sigma_1`` are resolved no better than the gradient's
    noise floor; the leading ones agree with the SVD's to float32 precision.
    """
    gram = _gram(a).double()
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(1).to(a.dtype).contiguous()


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``A^T A``. For a contiguous float32 CPU ``A``, the fused kernel's (:mod:`snsm._kernels`
    ``gram``: only the tiles on and above the diagonal, half a matmul's products, and exactly
    symmetric; 1.7-2x faster than ``a.T @ a`` on a 32000 x 256 or x 512 output head); else a matmul."""
    if a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous() and not torch.compiler.is_compiling():
        k = cpu_kernel()
        if k is not None:
            return k.gram(a)
    return a.T @ a


def _randomized_basis(a: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    big, small = a.shape
    width = min(small, rank + OVERSAMPLE)
    omega = torch.randn(big, width, generator=gen, device=a.device, dtype=a.dtype)
    y = a.T @ omega
    for _ in range(POWER_ITERS):
        y = a.T @ (a @ _orthonormal(y))
    q = _orthonormal(y)
    return (q @ _svd_basis(a @ q, rank)).contiguous()


def hadamard_rows(rows: torch.Tensor, order: int, columns: int, dtype=torch.float32) -> torch.Tensor:
    """Rows ``rows`` of the orthonormal Sylvester Hadamard matrix of ``order`` (a power of two), its
    first ``columns`` columns: ``H[i, j] = (-1)^popcount(i & j) / sqrt(order)``, built one bit of
    ``j`` at a time (each doubling appends the block times ``(-1)^{bit of i}``). ``len(rows) x columns``
    values instead of the ``order x order`` matrix."""
    if order & (order - 1) or not 0 < columns <= order:
        raise ValueError(f"hadamard_rows needs a power-of-two order >= columns > 0, got {order}, {columns}")
    h = torch.full((rows.numel(), 1), 1.0 / math.sqrt(order), dtype=dtype, device=rows.device)
    bit = 0
    while h.shape[1] < columns:
        sign = 1 - 2 * ((rows >> bit) & 1).to(dtype)
        h = torch.cat((h, h[:, : columns - h.shape[1]] * sign[:, None]), dim=1)
        bit += 1
    return h


def _srht_basis(a: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    big, small = a.shape
    padded = 1 << (big - 1).bit_length()
    signs = torch.randint(0, 2, (big, 1), generator=gen, device=a.device).to(a.dtype).mul_(2).sub_(1)
    width = min(small, 2 * rank, padded)
    rows = torch.randperm(padded, generator=gen, device=a.device)[:width]
    # fwht(D A zero-padded to `padded` rows)[rows]: only those rows of H, only its first `big`
    # columns (the padding is zero), one matmul instead of log2(padded) passes over the padded copy
    h = hadamard_rows(rows, padded, big, a.dtype)
    q = _orthonormal((h.mul_(signs.T) @ a).T)
    if width == rank:
        return q.contiguous()
    # keep the r directions of the 2r-wide sketch that carry the most of A's energy
    return (q @ _svd_basis(a @ q, rank)).contiguous()


def build_projector(
    proj: str, grad: torch.Tensor, rank: int, gen: Optional[torch.Generator] = None
) -> Optional[torch.Tensor]:
    """A fresh projector for ``grad`` (gradient orientation, any float dtype).

    Dense kinds return a float32 ``N x r`` orthonormal basis, row kinds an
    int64 index vector. Returns ``None`` when the gradient is all zero or
    non-finite or the factorization does not converge: the caller keeps its
    previous projector (or :func:`fallback_projector`).
    """
    g = grad.detach().float()
    if not _usable(tall(g, g.shape[0] >= g.shape[1])):
        return None
    try:
        q = raw_projector(proj, g, rank, gen)
    except torch.linalg.LinAlgError:
        return None
    return q if not q.is_floating_point() or bool(torch.isfinite(q).all()) else None


def raw_projector(proj: str, g: torch.Tensor, rank: int, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """The projector of a float32 gradient ``g``, without :func:`build_projector`'s checks (no host reads)."""
    a = tall(g, g.shape[0] >= g.shape[1])
    if proj == "svd":
        return _svd_basis(g, rank)
    if proj == "randomized":
        return _randomized_basis(a, rank, gen)
    if proj == "srht":
        return _srht_basis(a, rank, gen)
    if proj == "topk":
        return torch.topk(a.norm(dim=1), rank).indices
    if proj == "uniform":
        return torch.randperm(a.shape[0], generator=gen, device=a.device)[:rank]
    raise ValueError(f"Invalid proj: {proj!r} (allowed: {', '.join(PROJECTIONS)})")


def fallback_projector(proj: str, shape: tuple, rank: int, device) -> torch.Tensor:
    """A valid projector that needs no gradient: the first r coordinate directions / rows."""
    m, n = shape
    if proj in DENSE_PROJECTIONS:
        return torch.eye(min(m, n), rank, device=device)
    return torch.arange(rank, device=device)


def project(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``R = A Q`` (dense basis) or ``R = A[idx]`` (row selection), in the tall frame."""
    if p.is_floating_point():
        return a @ p.to(a.dtype)
    return a.index_select(0, p)


def numerator(a: torch.Tensor, m: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``N = back(M) + (A - back(R)) = A + back(M - R)`` in the tall frame."""
    if p.is_floating_point():
        return torch.addmm(a, m - r, p.to(a.dtype).T)
    return a.index_copy(0, p, m)


def transport(m: torch.Tensor, p_old: torch.Tensor, p_new: torch.Tensor, rows: int) -> torch.Tensor:
    """Carry tall-frame momentum ``m`` from basis ``p_old`` into ``p_new``.

    Dense: ``M Q_old^T Q_new``, the projection of the old back-projected
    momentum onto the new subspace. Rows: rows selected by both keep their
    momentum, newly selected rows start at zero.
    """
    if p_old.is_floating_point():
        return m @ (p_old.transpose(0, 1) @ p_new).to(m.dtype)  # not .T: torch.cond would see an aliased input
    full = m.new_zeros(rows, m.shape[1])
    full.index_copy_(0, p_old, m)
    return full.index_select(0, p_new)


def refresh_due(state: dict, sub: Subspace, step: int) -> bool:
    """Whether the projector is recomputed at ``step``: none yet, or the (staggered) gap has come round."""
    return (step + sub.offset) % sub.gap == 0 or int(state["proj_step"]) == 0


def refresh_projector(
    state: dict, g: torch.Tensor, mom_tall: torch.Tensor, sub: Subspace, step: int, warn, build=None, local=None,
    all_finite=None,
) -> bool:
    """Recompute the projector if due; apply the refresh policy to the momentum.

    ``build(gen)`` returns the new projector or ``None`` (default: from the full
    gradient ``g``); ``local`` is the tensor holding ``state["proj"]``'s values
    (its local view when state is a DTensor); ``all_finite(m)`` says whether
    the whole momentum is finite (default: ``m``'s values; a row shard asks
    every rank). Under ``transport`` a non-finite momentum is reset rather than
    carried into every direction of the new basis. Returns True when a new
    basis replaced an earlier one at this step.
    """
    if not refresh_due(state, sub, step):
        return False
    if g.device.type == "meta":  # no values to build a basis from (torch steps meta tensors as no-ops)
        state["proj_step"].fill_(step)
        return False
    proj_step = int(state["proj_step"])
    gen = None
    if "seed" in state:
        seed = int(state["seed"])
        gen = torch.Generator(device=g.device).manual_seed(seed)
        state["seed"].fill_(next_seed(seed))
    new = build(gen) if build is not None else build_projector(sub.proj, g, sub.rank, gen)
    if new is None:
        warn(
            f"proj{sub.shape}",
            f"could not compute a {sub.proj!r} projector for a {sub.shape} gradient at step {step} "
            "(all zero, non-finite, or the factorization failed): "
            + ("keeping the previous basis" if proj_step else "using coordinate directions until the next step"),
        )
        if proj_step:
            return False
        new = fallback_projector(sub.proj, sub.shape, sub.rank, g.device)
    else:
        state["proj_step"].fill_(step)
    old = state["proj"] if local is None else local
    if proj_step == 0 or sub.refresh == "reset":
        mom_tall.zero_()
    elif sub.refresh == "transport":
        if all_finite(mom_tall) if all_finite is not None else bool(torch.isfinite(mom_tall).all()):
            mom_tall.copy_(transport(mom_tall, old, new, max(sub.shape)))
        else:  # a NaN or inf would be carried into every direction of the new basis: start afresh
            mom_tall.zero_()
    # "reference": the old momentum is read in the new basis this step, zeroed after it
    old.copy_(new)
    return proj_step != 0


#: projectors whose refresh traces into one graph under torch.compile (the random ones seed a host RNG)
TRACEABLE_PROJECTIONS = ("svd", "topk")


def _fresh(*tensors):
    """Contiguous copies: ``torch.cond``'s branches must not alias their inputs and must agree on strides."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)


def refresh_projector_traced(state: dict, g: torch.Tensor, mom_tall: torch.Tensor, sub: Subspace, step):
    """:func:`refresh_projector` for ``torch.compile``: the same policy as tensor ops under ``torch.cond``.

    No host reads: whether a refresh is due, whether the gradient is usable
    (finite, not all zero) and what happens to the momentum are tensors.
    Returns a bool tensor: a new basis replaced an earlier one.
    """
    proj, proj_step = state["proj"], state["proj_step"]
    due = (proj_step == 0) | ((step + sub.offset) % sub.gap == 0)
    fallback = fallback_projector(sub.proj, sub.shape, sub.rank, g.device)

    def refresh(g, mom, old, proj_step, step):
        a = g.float()
        usable = torch.isfinite(a).all() & (a.abs().amax() > 0)
        new = raw_projector(sub.proj, torch.where(usable, a, torch.zeros_like(a)), sub.rank)
        first = proj_step == 0
        new = torch.where(usable, new, torch.where(first, fallback, old))
        if sub.refresh == "transport":  # a non-finite momentum starts afresh in the new basis
            carried = torch.where(torch.isfinite(mom).all(), transport(mom, old, new, max(sub.shape)),
                                  torch.zeros_like(mom))
        elif sub.refresh == "reset":
            carried = torch.zeros_like(mom)
        else:  # "reference": read in the new basis this step, zeroed after it
            carried = mom.clone()
        replaced = usable & ~first
        mom = torch.where(replaced, carried, torch.where(first, torch.zeros_like(mom), mom))
        return _fresh(mom, new, torch.where(usable, step.to(proj_step.dtype), proj_step), replaced)

    def keep(g, mom, old, proj_step, step):
        return _fresh(mom, old, proj_step, torch.zeros((), dtype=torch.bool, device=step.device))

    mom, new, new_step, replaced = torch.cond(due, refresh, keep, (g, mom_tall, proj, proj_step, step))
    mom_tall.copy_(mom)
    proj.copy_(new)
    proj_step.copy_(new_step)
    return replaced
