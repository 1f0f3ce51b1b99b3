r"""Row-sharded (FSDP2 / DTensor ``Shard(0)``) steps: local work, small collectives.

A parameter sharded by rows over a 1-D device mesh (what ``fully_shard``
makes, uneven shards included) is updated without gathering it. Every tensor
is read in its matrix view ``(shape[0], prod(shape[1:]))``, so a rank owns the
rows ``[r0, r0 + m_local)``. Per step, the communication is:

=====================================  ===========================================
Subset-Norm, coordinate-wise / per row  none (state sharded like the parameter)
Subset-Norm, per column (wide "auto")   all-reduce of ``n`` column sums (bucketed, asynchronous)
Subset-Norm, flat subsets (int size)    all-reduce of ``K ~ sqrt(d)`` subset sums
SM, dense basis, tall matrix            none (``G Q`` and the momentum are row-local)
SM, dense basis, wide matrix            all-reduce of ``R = Q^T G`` (``r x n``), with the
                                        column sums in the same message, asynchronous
SM, row selection, tall matrix          all-reduce of the ``r`` selected rows
SM, row selection, wide matrix          none (selected columns are row-local)
=====================================  ===========================================

At a projector refresh (every ``proj_gap`` steps, staggered per matrix):
``svd`` on a tall matrix all-reduces the ``n x n`` Gram matrix ``G^T G``
(computed in float64, then ``eigh``); ``topk`` reduces row norms (all-gather
of ``m`` values) or column sums (all-reduce of ``n``); ``uniform`` needs
nothing (every rank draws the same seeded indices); ``svd`` on a wide matrix
and ``randomized``/``srht`` all-gather the gradient once per refresh (for a
wide matrix that is smaller than its ``n x n`` Gram matrix). Every rank ends
with the same basis.

State is stored as DTensors on the parameter's mesh: ``Shard(0)`` for state
shaped like the parameter's rows (momentum, per-row or coordinate-wise
accumulators, tall subspace momentum), ``Replicate()`` for the rest (bases,
per-column or flat accumulators, wide subspace momentum), so Distributed
Checkpoint saves each rank's rows and reshards on load. Scalars (``step``,
``proj_step``, ``seed``) are plain tensors, identical on every rank.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import subspace as sm
from ._common import StepOptions, Workspace, apply_update_, compute_dtype, ema_, step_scale
from ._dtensor import DTensor, RowShard, local, row_sharding, rows_local
from .fused import EMPTY, kernel_for, one_pass, subspace_correction_
from .rounding import rounding_generator
from .subset_norm import SubsetLayout, accumulate_sums_, aligned, kernel_layout, second_moment_coefficients
from .weight_decay import decay_factor

__all__ = ["sn_step_sharded_", "sharded_step", "steps_locally", "local_views", "usable", "run_overlapped", "Reduce",
           "BUCKET_BYTES"]

if DTensor is not None:
    from torch.distributed.tensor import Shard

def _all_reduce(t: torch.Tensor, shard: RowShard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=shard.group)
    return t


def usable(g_local: torch.Tensor, shard: RowShard) -> bool:
    """All-zero or non-finite anywhere (on any rank) makes a gradient unusable for a projector.

    Each rank takes its rows' smallest and largest entry in one reduction (as
    :func:`snsm.subspace.build_projector` checks), then one max-reduce of two flags: whether
    any rank saw a non-finite entry, and the largest magnitude anywhere. A rank
    holding no rows contributes neither."""
    if g_local.numel():
        lo, hi = torch.aminmax(g_local)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        flags = torch.stack([(~finite).float(), torch.where(finite, torch.maximum(lo.abs(), hi.abs()), 0.0).float()])
    else:
        flags = torch.zeros(2, device=g_local.device)
    _all_reduce(flags, shard, dist.ReduceOp.MAX)
    return bool(flags[0] == 0) and bool(flags[1] > 0)


def _subset_sums(g2d: torch.Tensor, layout: SubsetLayout, shard: RowShard) -> torch.Tensor:
    """sum_{j in S_i} g_j^2, shaped like the accumulator's values held on this rank."""
    if layout.coordinate_wise:
        return g2d * g2d
    count, length = layout.view
    if rows_local(layout, shard.cols):  # one subset per row: row-local
        return (g2d * g2d).sum(dim=1, keepdim=True)
    if layout.dim == 0:  # one subset per column: partial column sums, reduced
        return _all_reduce((g2d * g2d).sum(dim=0, keepdim=True), shard)
    # flat contiguous subsets may cross shard boundaries: scatter partial sums, reduce
    first = shard.start * shard.cols
    ids = torch.arange(first, first + g2d.numel(), device=g2d.device) // length
    sums = g2d.new_zeros(count).index_add_(0, ids, (g2d * g2d).reshape(-1))
    return _all_reduce(sums, shard).view(count, 1)


def _denominator_like(num2d: torch.Tensor, v: torch.Tensor, layout: SubsetLayout, shard: RowShard, eps):
    """``sqrt(v) + eps`` broadcast to this rank's rows (shape of ``num2d``)."""
    d = v.sqrt().add_(eps)
    if layout.coordinate_wise:
        return d.reshape(num2d.shape)
    count, length = layout.view
    if rows_local(layout, shard.cols):
        return d.view(-1, 1)  # (rows held here, 1) broadcasts over the row
    if layout.dim == 0:
        return d  # (1, n)
    first = shard.start * shard.cols
    ids = torch.arange(first, first + num2d.numel(), device=num2d.device) // length
    return d.reshape(-1)[ids].view(num2d.shape)


def _sharded_projector(proj, grad_dt, g_local, shard, rank, is_tall, gen):
    """Build the same projector on every rank from reduced quantities (see module doc)."""
    if not usable(g_local, shard):
        return None
    if proj == "svd" and is_tall:
        gram = g_local.double().T @ g_local.double()
        _all_reduce(gram, shard)
        try:
            _, vecs = torch.linalg.eigh(gram)
        except torch.linalg.LinAlgError:
            return None
        return vecs[:, -rank:].flip(-1).float().contiguous()
    if proj == "topk" and is_tall:
        norms_local = g_local.float().norm(dim=1)
        norms = DTensor.from_local(norms_local, shard.mesh, [Shard(0)], run_check=False,
                                   shape=torch.Size([shard.rows]), stride=(1,)).full_tensor()
        return torch.topk(norms, rank).indices
    if proj == "topk":
        sq = _all_reduce((g_local.float() ** 2).sum(dim=0), shard)
        return torch.topk(sq.sqrt(), rank).indices
    if proj == "uniform":
        return torch.randperm(max(shard.rows, shard.cols), generator=gen, device=g_local.device)[:rank]
    full = grad_dt.full_tensor().reshape(shard.rows, shard.cols)
    return sm.build_projector(proj, full, rank, gen)


def _fused_local(param, state, layout, shard, subspace=None) -> bool:
    """Whether the fused CPU kernel applies to this shard.

    Without a subspace: subsets row-local (no collective needed) or one per
    column (an all-reduce of the column sums). With a dense subspace basis: one
    step size per row of the tall frame ("auto", or no second moment), as in
    :mod:`snsm.fused`.
    """
    p = param.to_local()
    dtypes_ok = all(local(t).dtype == torch.float32 for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    if subspace is None:
        fits = rows_local(layout, shard.cols) or _columns(layout, shard)
    else:
        fits = subspace.proj in sm.DENSE_PROJECTIONS and aligned(layout)
    return (fits and p.dtype == torch.float32
            and p.is_contiguous() and dtypes_ok and kernel_for(p.device) is not None)


def _columns(layout: Optional[SubsetLayout], shard: RowShard) -> bool:
    """One subset per column of the matrix view (a wide matrix under "auto")."""
    return layout is not None and not layout.coordinate_wise and layout.dim == 0 and layout.view[1] == shard.cols


def steps_locally(param, state, options: StepOptions) -> bool:
    """Whether a shard's step is the kernel's pass over its own rows with no collective (no
    subspace; subsets that are the rows, or coordinates): the optimizer then puts it in its one
    kernel call with the plain tensors of :func:`local_views`."""
    if options.subspace is not None:
        return False
    shard = row_sharding(param)
    return rows_local(options.layout, shard.cols) and _fused_local(param, state, options.layout, shard)


def local_views(param, grad, state):
    """``(local param, local grad, local state)`` of a shard, for :func:`snsm.fused.fused_steps_`;
    the state stays the DTensors it was."""
    views = {"step": state["step"]}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            views[key] = local(state[key])
    return param.to_local(), grad.to_local(), views


def _fused_local_step(param, grad, state, lr, o: StepOptions, shard):
    """The kernel's one pass on this rank's rows (a generator: it yields its per-column sums as a
    :class:`Reduce` and goes on once they are summed over the ranks)."""
    state["step"] += 1
    step = int(state["step"].item())
    lr = float(lr)
    scale = step_scale(lr, o.beta1, o.beta2, step, o.bias_correction)
    v_decay, v_gain = second_moment_coefficients(o.beta2)
    kind, row_len = kernel_layout(o.layout)
    if kind == 1:
        row_len = shard.cols  # row-local subsets: the local shard's rows
    g = grad.to_local()
    g = g if g.is_contiguous() else g.contiguous()
    m = local(state["exp_avg"]) if o.beta1 > 0 else EMPTY
    v = local(state["exp_avg_sq"]) if o.beta2 is not None else EMPTY
    update_v = True
    if o.beta2 is not None and kind == 2:  # column sums cross the shards
        sums = (g.view(shard.count, shard.cols) ** 2).sum(dim=0)
        yield Reduce(sums, shard.group)
        accumulate_sums_(v, sums.view(v.shape), o.beta2)
        update_v = False
    kernel_for(g.device).sn_step(param.to_local(), g, m, v, kind, row_len, o.beta1, v_decay, v_gain, update_v, o.eps,
                                 scale, decay_factor(lr, o.weight_decay))


def _fused_dense_subspace(p2d, g2d, mom, q, state, o: StepOptions, scale, decay, shard, is_tall):
    r"""The fused subspace step on a shard (see :mod:`snsm.fused`): no numerator is built.

    Tall (rows local, ``q`` the ``n x r`` basis, per-row ``D``): every row is
    independent, so the CPU kernel's one-pass step takes this rank's rows as it
    takes a whole matrix (``R = G Q``, ``M``, ``v``, ``W <- (W - s G / D) decay
    - s decay ((M - R) / D) Q^T`` block by block). Otherwise the kernel's
    ``W = (W - s G / D) decay`` first, then the rank-r part times ``decay``
    (:func:`snsm.fused.subspace_correction_`): tall, ``R = G Q``; wide (``q``
    this rank's rows of the ``m x r`` basis, replicated ``r x n`` momentum,
    per-column ``D`` from all-reduced column sums), ``R = sum_ranks q^T G``.
    """
    k = kernel_for(g2d.device)
    beta2 = o.beta2
    v_decay, v_gain = second_moment_coefficients(beta2)
    v = local(state["exp_avg_sq"]) if beta2 is not None else EMPTY
    g = g2d if g2d.is_contiguous() else g2d.contiguous()
    kind = 0 if beta2 is None else (1 if is_tall else 2)
    if is_tall and one_pass(k, q, mom, v, beta2, None):  # the caller checked the layout (row subsets)
        if shard.count:
            k.fused_step([], [], [], [], [], [], [], [p2d], [g], [mom], [q], [v], [shard.count, shard.cols, True],
                         [o.beta1, v_decay, v_gain, o.eps, scale, decay], [])
        return
    if is_tall:
        r = g @ q
    else:  # R = Q^T G and the column sums both cross the shards: one all-reduce of (r + 1) x n
        both = g.new_empty(q.shape[1] + (beta2 is not None), g.shape[1])
        torch.mm(q.T, g, out=both[: q.shape[1]])
        if beta2 is not None:
            torch.sum(g * g, dim=0, out=both[-1])
        yield Reduce(both, shard.group)  # other parameters' steps run while the sums travel
        r = both[: q.shape[1]]
        if beta2 is not None:
            accumulate_sums_(v, both[-1].view(v.shape), beta2)
    ema_(mom, r, o.beta1)
    # the kernel's pass (W - s G / D) * decay, updating row-local v; then the rank-r part after it
    k.sn_step(p2d, g, EMPTY, v, kind, shard.cols, 0.0, v_decay, v_gain, is_tall, o.eps, scale, decay)
    d = None if beta2 is None else v.view(-1, 1).sqrt().add_(o.eps)  # per row of the tall frame
    subspace_correction_(p2d, sm.tall(mom, is_tall), sm.tall(r, is_tall), q, d, -scale * decay, is_tall)


class Reduce(NamedTuple):
    """What a :func:`sharded_step` generator yields: ``tensor``, to be summed over ``group`` in
    place before the step goes on."""

    tensor: torch.Tensor
    group: object


def sn_step_sharded_(param, grad, state, lr, options: StepOptions) -> None:
    """:func:`snsm._reference.sn_step_` for a row-sharded DTensor parameter (same arguments)."""
    for request in sharded_step(param, grad, state, lr, options):
        dist.all_reduce(request.tensor, group=request.group)


BUCKET_BYTES = 1 << 16  # sums smaller than this travel together (see run_overlapped)


def _launch_bucketed(requests):
    """All-reduce the requests' tensors asynchronously, one message per process group and dtype
    (a collective costs the same fixed latency for a few bytes as for a few kilobytes); returns
    what :func:`_finish_bucketed` needs."""
    buckets = {}  # (group, dtype, device) -> tensors, in the order the requests came (the same on every rank)
    for req in requests:
        buckets.setdefault((req.group, req.tensor.dtype, req.tensor.device), []).append(req.tensor)
    launched = []
    for (group, _, _), tensors in buckets.items():
        flat = tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        launched.append((dist.all_reduce(flat, group=group, async_op=True), flat, tensors))
    return launched


def _finish_bucketed(launched) -> None:
    for work, flat, tensors in launched:
        work.wait()
        if len(tensors) > 1:
            offset = 0
            for t in tensors:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def run_overlapped(steps, meanwhile=None) -> None:
    """Run :func:`sharded_step` generators so their all-reduces overlap: every step up to its
    collective, launched asynchronously (in the same order on every rank): at once if it is
    large (``BUCKET_BYTES`` or more: a wide matrix's ``R``, which travels while the next steps
    compute theirs), else bucketed with the other small ones into one message per process group
    once every step has come that far (column sums: one fixed latency instead of one each).
    Then ``meanwhile()`` (other work to hide them behind, e.g. the kernel call for everything
    else), then each step to the end."""
    pending, small, launched = [], [], []
    for s in steps:
        request = next(s, None)
        if request is None:
            continue
        pending.append(s)
        if request.tensor.numel() * request.tensor.element_size() >= BUCKET_BYTES:
            launched += _launch_bucketed([request])
        else:
            small.append(request)
    launched += _launch_bucketed(small)
    if meanwhile is not None:
        meanwhile()
    _finish_bucketed(launched)
    for s in pending:
        for request in s:  # a step yields once; a further request would be summed on its own
            dist.all_reduce(request.tensor, group=request.group)


def sharded_step(param, grad, state, lr, options: StepOptions):
    """:func:`sn_step_sharded_` as a generator: where its step needs a per-step sum over the ranks
    (column sums; ``R = Q^T G`` of a wide matrix under the fused subspace step), it yields a
    :class:`Reduce` and goes on once the caller has summed it (:func:`run_overlapped` buckets those
    of many parameters into one asynchronous message and works on other parameters meanwhile);
    other steps run to completion on the first ``next``.

    Low-precision state is written back as the reference path writes it
    (stochastic rounding from ``options.rounding_seed``): row-sharded state
    draws the whole tensor's noise and keeps its rows, so a sharded run equals
    one process.
    """
    o = options
    beta1, beta2, subspace, layout = o.beta1, o.beta2, o.subspace, o.layout
    shard = row_sharding(param)
    if subspace is None and _fused_local(param, state, layout, shard):
        yield from _fused_local_step(param, grad, state, lr, o, shard)
        return
    p2d = param.to_local().view(shard.count, shard.cols)
    compute = compute_dtype(p2d)
    g2d = grad.to_local().to(compute).reshape(shard.count, shard.cols)
    state["step"] += 1
    step = int(state["step"].item())
    generator = None if o.rounding_seed is None else rounding_generator(o.rounding_seed, state["step"], g2d.device)
    workspace = Workspace(compute, generator)

    def working(key):
        """State ``key``'s local values in the compute dtype; a row shard rounds as its rows of the whole."""
        t = state[key]
        rows = None
        if DTensor is not None and isinstance(t, DTensor) and isinstance(t.placements[0], Shard):
            rows = (shard.start, t.shape[0])
        return workspace(local(t), rows)

    if subspace is not None:
        is_tall = subspace.is_tall
        dense = subspace.proj in sm.DENSE_PROJECTIONS
        mom = working("exp_avg")  # gradient orientation; rows local when sharded
        mom_a = sm.tall(mom, is_tall)
        proj_local = local(state["proj"])

        def build(gen):
            return _sharded_projector(subspace.proj, grad, g2d, shard, subspace.rank, is_tall, gen)

        def all_finite(m):
            flag = torch.isfinite(m).all().float().reshape(1)
            if isinstance(state["exp_avg"], DTensor) and isinstance(state["exp_avg"].placements[0], Shard):
                _all_reduce(flag, shard, dist.ReduceOp.MIN)  # rows on every rank: all must be finite
            return bool(flag)

        refreshed = sm.refresh_projector(state, g2d, mom_a, subspace, step, o.warn, build=build, local=proj_local,
                                         all_finite=all_finite)
        p = proj_local
        rows = slice(shard.start, shard.start + shard.count)
        if _fused_local(param, state, layout, shard, subspace):
            yield from _fused_dense_subspace(p2d, g2d, mom, p if is_tall else p[rows], state, o,
                                             step_scale(lr, beta1, beta2, step, o.bias_correction),
                                             decay_factor(float(lr), o.weight_decay), shard, is_tall)
            if refreshed and subspace.refresh == "reference":
                mom.zero_()
            return
        if dense and is_tall:  # R = G Q, rows local
            r = sm.project(g2d, p)
            ema_(mom, r, beta1)
            num = sm.numerator(g2d, mom, r, p)
        elif dense:  # R = Q^T G summed over ranks; replicated momentum (r x n)
            q_local = p[rows].to(compute)
            r = _all_reduce(q_local.T @ g2d, shard)
            ema_(mom, r, beta1)
            num = torch.addmm(g2d, q_local, mom - r)
        elif is_tall:  # selected global rows: the owners contribute them
            held = (p >= shard.start) & (p < shard.start + shard.count)
            r = g2d.new_zeros(subspace.rank, shard.cols)
            r[held] = g2d[p[held] - shard.start]
            _all_reduce(r, shard)
            ema_(mom, r, beta1)
            num = g2d.clone()
            num[p[held] - shard.start] = mom[held]
        else:  # selected columns of local rows
            r = g2d.index_select(1, p)
            ema_(mom, r, beta1)
            num = g2d.index_copy(1, p, mom)
        if refreshed and subspace.refresh == "reference":
            mom.zero_()
    elif beta1 > 0:
        num = ema_(working("exp_avg").view(shard.count, shard.cols), g2d, beta1)
    else:
        num = g2d

    if beta2 is not None:
        v = working("exp_avg_sq")
        accumulate_sums_(v, _subset_sums(g2d, layout, shard).view(v.shape), beta2)
        update = num / _denominator_like(num, v, layout, shard, o.eps)
    else:
        update = num

    apply_update_(p2d, update, lr, step_scale(lr, beta1, beta2, step, o.bias_correction), o.weight_decay)
    workspace.write_back()
