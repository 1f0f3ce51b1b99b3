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

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import subspace as sm
from .subset_norm import SubsetLayout

__all__ = ["is_dtensor", "row_sharding", "rows_local", "RowShard", "state_tensor", "local", "sn_step_sharded_",
           "sharded_step", "run_overlapped", "Reduce", "gather_rows"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - older torch: no DTensor support
    DTensor = None


class RowShard(NamedTuple):
    """Where a rank's rows sit in the matrix view of a row-sharded parameter."""

    mesh: object
    rows: int  # global rows (shape[0])
    cols: int  # prod(shape[1:])
    start: int  # first global row held here
    count: int  # rows held here

    @property
    def group(self):
        return self.mesh.get_group()


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def row_sharding(p) -> RowShard:
    """The row sharding of a DTensor parameter.

    Raises for layouts this module does not handle (replicated DTensors, 2-D
    meshes, ``Shard(d > 0)``); plain tensors (DDP) need no special handling.
    """
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise NotImplementedError(
            f"snsm supports DTensor parameters sharded by rows on a 1-D mesh (FSDP2's Shard(0)); "
            f"got placements {placements} on a {p.device_mesh.ndim}-D mesh"
        )
    mesh = p.device_mesh
    # a step asks for every parameter's offsets, which cost more than the math: cached by plain
    # values (holding no mesh, so no process group outlives destroy_process_group)
    key = (tuple(p.shape), placements, mesh.size(), tuple(mesh.get_coordinate() or ()))
    found = _OFFSETS.get(key)
    if found is None:
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        found = _OFFSETS[key] = (offset[0] if p.ndim else 0, local_shape[0] if p.ndim else 1)
    rows = p.shape[0] if p.ndim else 1
    cols = p.numel() // rows if rows else 0
    return RowShard(mesh, rows, cols, *found)


_OFFSETS: dict = {}


def local(t):
    """The local values of a DTensor (a view: in-place ops write through), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def state_tensor(p, shape, dtype, sharded_rows: bool):
    """A zero state tensor for DTensor parameter ``p``: ``Shard(0)`` by ``p``'s rows, or ``Replicate()``."""
    shard = row_sharding(p)
    shape = tuple(shape)
    if sharded_rows:
        local_shape = (shard.count,) + shape[1:]
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        data = torch.zeros(local_shape, dtype=dtype, device=p.to_local().device)
        return DTensor.from_local(data, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)
    data = torch.zeros(shape, dtype=dtype, device=p.to_local().device)
    return DTensor.from_local(data, p.device_mesh, [Replicate()], run_check=False)


def gather_rows(local_rows: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """The full matrix from every rank's rows (uneven shards included): one all-gather."""
    whole = DTensor.from_local(local_rows, shard.mesh, [Shard(0)], run_check=False,
                               shape=torch.Size([shard.rows, local_rows.shape[1]]),
                               stride=(local_rows.shape[1], 1))
    return whole.full_tensor()


def rows_local(layout: Optional[SubsetLayout], cols: int) -> bool:
    """Whether each subset lies in one row of the matrix view (so the accumulator shards by rows)."""
    return layout is None or layout.coordinate_wise or (layout.dim == 1 and layout.view[1] == cols)


def _all_reduce(t: torch.Tensor, shard: RowShard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=shard.group)
    return t


def _usable(g_local: torch.Tensor, shard: RowShard) -> bool:
    """All-zero or non-finite anywhere (on any rank) makes a gradient unusable for a projector.

    Each rank takes its rows' smallest and largest entry in one reduction (as
    :func:`snsm.subspace._usable` does), then one max-reduce of two flags: whether
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
    if not _usable(g_local, shard):
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
    from . import fused

    p = param.to_local()
    dtypes_ok = all(local(t).dtype == torch.float32 for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    if subspace is None:
        fits = rows_local(layout, shard.cols) or _columns(layout, shard)
    else:
        fits = subspace.proj in sm.DENSE_PROJECTIONS and fused.aligned(layout)
    return (fits and p.dtype == torch.float32
            and p.is_contiguous() and dtypes_ok and fused.kernel_for(p.device) is not None)


def _columns(layout: Optional[SubsetLayout], shard: RowShard) -> bool:
    """One subset per column of the matrix view (a wide matrix under "auto")."""
    return layout is not None and not layout.coordinate_wise and layout.dim == 0 and layout.view[1] == shard.cols


def steps_locally(param, state, options) -> bool:
    """Whether a shard's step is the kernel's pass over its own rows with no collective (no
    subspace; subsets that are the rows, or coordinates): the optimizer then puts it in its one
    kernel call with the plain tensors of :func:`local_views`."""
    if options["subspace"] is not None:
        return False
    shard = row_sharding(param)
    return rows_local(options["layout"], shard.cols) and _fused_local(param, state, options["layout"], shard)


def local_views(param, grad, state):
    """``(local param, local grad, local state)`` of a shard, for :func:`snsm.fused.fused_steps_`;
    the state stays the DTensors it was."""
    views = {"step": state["step"]}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            views[key] = local(state[key])
    return param.to_local(), grad.to_local(), views


def _fused_local_step(param, grad, state, *, lr, beta1, beta2, eps, weight_decay, bias_correction, layout, shard):
    """The kernel's one pass on this rank's rows (a generator: it yields its per-column sums as a
    :class:`Reduce` and goes on once they are summed over the ranks)."""
    from .fused import _EMPTY, _kernel_layout, _second_moment, kernel_for
    from .optimizer import step_scale

    state["step"] += 1
    step = int(state["step"].item())
    lr = float(lr)
    scale = step_scale(lr, beta1, beta2, step, bias_correction)
    v_decay, v_gain = _second_moment(beta2)
    kind, row_len = _kernel_layout(layout)
    if kind == 1:
        row_len = shard.cols  # row-local subsets: the local shard's rows
    g = grad.to_local()
    g = g if g.is_contiguous() else g.contiguous()
    m = local(state["exp_avg"]) if beta1 > 0 else _EMPTY
    v = local(state["exp_avg_sq"]) if beta2 is not None else _EMPTY
    update_v = True
    if beta2 is not None and kind == 2:  # column sums cross the shards
        sums = (g.view(shard.count, shard.cols) ** 2).sum(dim=0)
        yield Reduce(sums, shard.group)
        v.mul_(v_decay).add_(sums.view(v.shape), alpha=v_gain)
        update_v = False
    kernel_for(g.device).sn_step(param.to_local(), g, m, v, kind, row_len, beta1, v_decay, v_gain, update_v, eps,
                                 scale, 1.0 - lr * weight_decay)


def _fused_dense_subspace(p2d, g2d, mom, q, state, *, beta1, beta2, eps, scale, decay, shard, is_tall):
    r"""The fused subspace step on a shard (see :mod:`snsm.fused`): no numerator is built.

    Tall (rows local, ``q`` the ``n x r`` basis, per-row ``D``): every row is
    independent, so the CPU kernel's one-pass step takes this rank's rows as it
    takes a whole matrix (``R = G Q``, ``M``, ``v``, ``W <- (W - s G / D) decay
    - s decay ((M - R) / D) Q^T`` block by block). Otherwise the kernel's
    ``W = (W - s G / D) decay`` first, then the rank-r part times ``decay``: tall,
    ``R = G Q``, ``W -= s ((M - R) / D) Q^T``; wide (``q`` this rank's rows of
    the ``m x r`` basis, replicated ``r x n`` momentum, per-column ``D`` from
    all-reduced column sums), ``R = sum_ranks q^T G``, ``W -= s q ((M - R) / D)``.
    """
    from .fused import _EMPTY, _one_pass, _second_moment, kernel_for

    k = kernel_for(g2d.device)
    v_decay, v_gain = _second_moment(beta2)
    v = local(state["exp_avg_sq"]) if beta2 is not None else _EMPTY
    g = g2d if g2d.is_contiguous() else g2d.contiguous()
    kind = 0 if beta2 is None else (1 if is_tall else 2)
    if is_tall and _one_pass(k, q, mom, v, beta2, None):  # the caller checked the layout (row subsets)
        if shard.count:
            k.fused_step([], [], [], [], [], [], [], [p2d], [g], [mom], [q], [v], [shard.count, shard.cols, True],
                         [beta1, v_decay, v_gain, eps, scale, decay], [])
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
            v.mul_(v_decay).add_(both[-1].view(v.shape), alpha=v_gain)
    mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
    # the kernel's pass (W - s G / D) * decay, updating row-local v; then the rank-r part after it
    k.sn_step(p2d, g, _EMPTY, v, kind, shard.cols, 0.0, v_decay, v_gain, is_tall, eps, scale, decay)
    x = torch.sub(mom, r, out=r)
    if beta2 is not None:
        x.div_(v.view(-1, 1).sqrt().add_(eps) if is_tall else v.view(1, -1).sqrt().add_(eps))
    if is_tall:
        p2d.addmm_(x, q.T, alpha=-scale * decay)
    else:
        p2d.addmm_(q, x, alpha=-scale * decay)


class Reduce(NamedTuple):
    """What a :func:`sharded_step` generator yields: ``tensor``, to be summed over ``group`` in
    place before the step goes on."""

    tensor: torch.Tensor
    group: object


def sn_step_sharded_(param, grad, state, **options) -> None:
    """:func:`snsm.optimizer.sn_step_` for a row-sharded DTensor parameter (same arguments)."""
    for request in sharded_step(param, grad, state, **options):
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


def sharded_step(
    param, grad, state, *, lr, beta1, beta2, eps, weight_decay, bias_correction, layout, subspace, warn
):
    """:func:`sn_step_sharded_` as a generator: where its step needs a per-step sum over the ranks
    (column sums; ``R = Q^T G`` of a wide matrix under the fused subspace step), it yields a
    :class:`Reduce` and goes on once the caller has summed it (:func:`run_overlapped` buckets those
    of many parameters into one asynchronous message and works on other parameters meanwhile);
    other steps run to completion on the first ``next``."""
    from .optimizer import Workspace, _refresh_projector, apply_update_, step_scale

    shard = row_sharding(param)
    if subspace is None and _fused_local(param, state, layout, shard):
        yield from _fused_local_step(param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                     weight_decay=weight_decay, bias_correction=bias_correction, layout=layout,
                                     shard=shard)
        return
    p2d = param.to_local().view(shard.count, shard.cols)
    compute = torch.float32 if p2d.dtype in (torch.bfloat16, torch.float16) else p2d.dtype
    g2d = grad.to_local().to(compute).reshape(shard.count, shard.cols)
    state["step"] += 1
    step = int(state["step"].item())
    workspace = Workspace(compute)

    def working(t):
        return workspace(local(t))

    if subspace is not None:
        is_tall = subspace.is_tall
        dense = subspace.proj in sm.DENSE_PROJECTIONS
        mom = working(state["exp_avg"])  # gradient orientation; rows local when sharded
        mom_a = sm.tall(mom, is_tall)
        proj_local = local(state["proj"])

        def build(gen):
            return _sharded_projector(subspace.proj, grad, g2d, shard, subspace.rank, is_tall, gen)

        refreshed = _refresh_projector(state, g2d, mom_a, subspace, step, warn, build=build, local=proj_local)
        p = proj_local
        rows = slice(shard.start, shard.start + shard.count)
        if _fused_local(param, state, layout, shard, subspace):
            yield from _fused_dense_subspace(p2d, g2d, mom, p if is_tall else p[rows], state, beta1=beta1, beta2=beta2, eps=eps,
                                  scale=step_scale(lr, beta1, beta2, step, bias_correction),
                                  decay=1.0 - float(lr) * weight_decay, shard=shard, is_tall=is_tall)
            if refreshed and subspace.refresh == "reference":
                mom.zero_()
            return
        if dense and is_tall:  # R = G Q, rows local
            r = g2d @ p.to(compute)
            mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
            num = torch.addmm(g2d, mom - r, p.to(compute).T)
        elif dense:  # R = Q^T G summed over ranks; replicated momentum (r x n)
            q_local = p[rows].to(compute)
            r = _all_reduce(q_local.T @ g2d, shard)
            mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
            num = torch.addmm(g2d, q_local, mom - r)
        elif is_tall:  # selected global rows: the owners contribute them
            held = (p >= shard.start) & (p < shard.start + shard.count)
            r = g2d.new_zeros(subspace.rank, shard.cols)
            r[held] = g2d[p[held] - shard.start]
            _all_reduce(r, shard)
            mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
            num = g2d.clone()
            num[p[held] - shard.start] = mom[held]
        else:  # selected columns of local rows
            r = g2d.index_select(1, p)
            mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
            num = g2d.index_copy(1, p, mom)
        if refreshed and subspace.refresh == "reference":
            mom.zero_()
    elif beta1 > 0:
        num = working(state["exp_avg"]).view(shard.count, shard.cols).mul_(beta1).add_(g2d, alpha=1.0 - beta1)
    else:
        num = g2d

    if beta2 is not None:
        v = working(state["exp_avg_sq"])
        sums = _subset_sums(g2d, layout, shard).view(v.shape)
        if beta2 == 1.0:
            v.add_(sums)
        else:
            v.mul_(beta2).add_(sums, alpha=1.0 - beta2)
        update = num / _denominator_like(num, v, layout, shard, eps)
    else:
        update = num

    apply_update_(p2d, update, lr, step_scale(lr, beta1, beta2, step, bias_correction), weight_decay)
    workspace.write_back()
