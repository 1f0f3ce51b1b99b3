"""DTensor helpers: what a row-sharded (FSDP2 ``Shard(0)``) parameter's rows are, local views, state.

Every tensor is read in its matrix view ``(shape[0], prod(shape[1:]))``; a
rank owns the rows ``[start, start + count)`` of it (:class:`RowShard`).
Used by the paths (:mod:`snsm.distributed`, :mod:`snsm.fused`) and the shell;
imports nothing of the package but :mod:`snsm.subset_norm`'s layout type.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .subset_norm import SubsetLayout

__all__ = ["DTensor", "RowShard", "is_dtensor", "row_sharding", "local", "state_tensor", "gather_rows", "rows_local"]

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
