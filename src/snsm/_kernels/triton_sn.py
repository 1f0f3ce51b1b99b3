r"""The fused Subset-Norm step as Triton kernels, for CUDA tensors.

Same contract as the C++ CPU kernel (``sn_cpu.cpp``): one pass over each
tensor, in place,

.. math::

    m \leftarrow \beta_1 m + (1 - \beta_1) g,\qquad
    v_S \leftarrow d_v v_S + a_v \textstyle\sum_{j \in S} g_j^2,\qquad
    p \leftarrow \bigl(p - s\, m / (\sqrt{v_S} + \epsilon)\bigr) \cdot \text{decay}

with ``layout`` 0 (coordinate-wise, or no ``v``), 1 (one subset per
contiguous row of length ``row_len``: one program per row sums the row, then
updates it while it is in cache) or 2 (one subset per column: the column sums
are one torch reduction, the update one elementwise pass). Empty ``m`` / ``v``
tensors mean "no momentum" / "no second moment" (SGD).

Triton is imported on first use only; CPU users never need it. The kernels
are built per ``TRITON_INTERPRET`` setting, so tests run their logic on CPU
tensors through Triton's interpreter.
"""
from __future__ import annotations

import functools
import os

__all__ = ["available", "sn_step", "sn_accumulate"]

BLOCK = 1024


def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _build(interpret: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def rows_kernel(P, G, M, V, row_len, b1, c1, vd, vg, eps, step, decay,
                    HAS_M: tl.constexpr, UPDATE_V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * row_len
        vi = tl.load(V + row)
        if UPDATE_V:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, row_len, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                g = tl.load(G + base + offs, mask=offs < row_len, other=0.0)
                acc += g * g
            vi = vd * vi + vg * tl.sum(acc, axis=0)
            tl.store(V + row, vi)
        d = tl.sqrt(vi) + eps
        for start in range(0, row_len, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < row_len
            g = tl.load(G + base + offs, mask=mask, other=0.0)
            p = tl.load(P + base + offs, mask=mask, other=0.0)
            num = g
            if HAS_M:
                num = b1 * tl.load(M + base + offs, mask=mask, other=0.0) + c1 * g
                tl.store(M + base + offs, num, mask=mask)
            tl.store(P + base + offs, (p - step * (num / d)) * decay, mask=mask)

    @triton.jit
    def flat_kernel(P, G, M, V, n, cols, b1, c1, vd, vg, eps, step, decay,
                    HAS_M: tl.constexpr, V_MODE: tl.constexpr, UPDATE_V: tl.constexpr, BLOCK: tl.constexpr):
        # V_MODE 0: no v; 1: one v per element; 2: one v per column (index offs % cols, already updated)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0)
        p = tl.load(P + offs, mask=mask, other=0.0)
        num = g
        if HAS_M:
            num = b1 * tl.load(M + offs, mask=mask, other=0.0) + c1 * g
            tl.store(M + offs, num, mask=mask)
        if V_MODE == 1:
            v = tl.load(V + offs, mask=mask, other=1.0)
            if UPDATE_V:
                v = vd * v + vg * (g * g)
                tl.store(V + offs, v, mask=mask)
            num = num / (tl.sqrt(v) + eps)
        if V_MODE == 2:
            v = tl.load(V + offs % cols, mask=mask, other=1.0)
            num = num / (tl.sqrt(v) + eps)
        tl.store(P + offs, (p - step * num) * decay, mask=mask)

    return triton, rows_kernel, flat_kernel


def _kernels():
    return _build(os.environ.get("TRITON_INTERPRET", "0") == "1")


def sn_accumulate(g, v, layout: int, row_len: int, v_decay: float, v_gain: float) -> None:
    """``v_S <- v_decay v_S + v_gain sum_S g^2`` in place (layouts as :func:`sn_step`)."""
    if layout == 0:
        sq = g * g
    elif layout == 1:
        sq = (g.reshape(-1, row_len) * g.reshape(-1, row_len)).sum(dim=1)
    else:
        sq = (g.reshape(-1, row_len) * g.reshape(-1, row_len)).sum(dim=0)
    v.mul_(v_decay).add_(sq.view(v.shape), alpha=v_gain)


def sn_step(p, g, m, v, layout: int, row_len: int, beta1: float, v_decay: float, v_gain: float, update_v: bool,
            eps: float, step: float, decay: float) -> None:
    """One fused Subset-Norm step in place (the C++ kernel's signature; float32 contiguous tensors)."""
    triton, rows_kernel, flat_kernel = _kernels()
    has_m, has_v = m.numel() > 0, v.numel() > 0
    n = p.numel()
    if n == 0:
        return
    scalars = (float(beta1), 1.0 - float(beta1), float(v_decay), float(v_gain), float(eps), float(step), float(decay))
    if has_v and layout == 1:
        if v.numel() * row_len != n:
            raise ValueError(f"exp_avg_sq must hold one value per row ({n // row_len}), got {v.numel()}")
        rows_kernel[(v.numel(),)](p, g, m if has_m else p, v, row_len, *scalars, HAS_M=has_m, UPDATE_V=update_v,
                                  BLOCK=min(BLOCK, triton.next_power_of_2(row_len)))
        return
    v_mode = 0 if not has_v else (1 if layout == 0 else 2)
    if v_mode == 2 and update_v:
        sn_accumulate(g, v, 2, row_len, v_decay, v_gain)
    grid = (triton.cdiv(n, BLOCK),)
    flat_kernel[grid](p, g, m if has_m else p, v if has_v else p, n, max(row_len, 1), *scalars, HAS_M=has_m,
                      V_MODE=v_mode, UPDATE_V=update_v and v_mode == 1, BLOCK=BLOCK)
