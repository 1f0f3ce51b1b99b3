r"""Stochastic rounding of float32 values into bfloat16 state.

bfloat16 keeps 8 significant bits: an accumulator updated by increments below
half a unit in the last place (``v += g^2`` once ``v`` is large, an EMA with
``beta2`` close to 1) stops moving under round-to-nearest. Stochastic rounding
rounds ``x`` up with probability equal to the dropped fraction,

.. math::

    \mathrm{SR}(x) = \lfloor x \rfloor_{bf16} + \mathrm{ulp}(x)\,
        [\,u < (x - \lfloor x \rfloor_{bf16}) / \mathrm{ulp}(x)\,],\qquad u \sim U[0, 1)

so ``E[SR(x)] = x`` and small increments survive on average. Implemented on
the bits: add 16 uniform random bits to the float32 pattern's low half (the
bits bfloat16 drops), then truncate. For negative numbers the same carry
raises the magnitude, so the rounding is unbiased for both signs.
"""
from __future__ import annotations

import torch

__all__ = ["stochastic_round_", "rounding_generator"]

_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator,
                      rows=None) -> torch.Tensor:
    """``target.copy_(SR(value))``: float32 ``value`` rounded stochastically into bfloat16 ``target``.

    ``rows=(start, total)``: ``value`` holds rows ``[start, start + value.shape[0])`` of a tensor of
    ``total`` rows (a row shard). The noise of the whole tensor is drawn and this shard's rows kept,
    so a sharded run rounds exactly as one process does (at the cost of a temporary of the whole
    tensor's size in int32).
    """
    if target.dtype != torch.bfloat16:
        raise TypeError(f"stochastic_round_ writes bfloat16 tensors (got {target.dtype})")
    bits = value.to(torch.float32).contiguous().view(torch.int32)
    if rows is None:
        noise = torch.randint(0, _LOW_BITS, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    else:
        start, total = rows
        whole = (total,) + tuple(bits.shape[1:])
        noise = torch.randint(0, _LOW_BITS, whole, generator=generator, device=bits.device, dtype=torch.int32)
        noise = noise[start: start + bits.shape[0]]
    finite = torch.isfinite(value)
    rounded = torch.where(finite, bits + noise, bits).bitwise_and_(_HIGH_MASK).view(torch.float32)
    return target.copy_(rounded.view(target.shape))  # exact: the low 16 bits are zero


def rounding_generator(seed: int, step, device) -> torch.Generator:
    """The random stream of one parameter's write-back at one step (fixed by both: resumes draw the same bits)."""
    step = int(step)
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (1 << 63))
