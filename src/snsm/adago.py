r"""AdaGO: AdaGrad-Norm step sizes for Muon's orthogonalized momentum.

From "AdaGrad Meets Muon: Adaptive Stepsizes for Orthogonal Updates"
(Zhang, Liu & Schaeffer, arXiv 2509.02981). For every matrix ``W`` (a tensor
with ``ndim >= 2`` is viewed as ``(shape[0], prod(shape[1:]))``) with gradient
``G_t``:

.. math::

    M_t = \mu M_{t-1} + (1 - \mu) G_t

    O_t = \mathrm{NS}_k(M_t) \approx U V^\top \quad (M_t = U \Sigma V^\top)

    v_t^2 = v_{t-1}^2 + \min(\lVert G_t \rVert_F^2, \gamma^2)

    \alpha_t = \max\bigl(\epsilon,\ \eta_t \min(\lVert G_t \rVert_F, \gamma) / v_t\bigr)

    W \leftarrow (1 - \eta_t \lambda) W - s\, \alpha_t O_t

``NS_k`` is ``k`` steps of the quintic Newton-Schulz iteration with
``torch.optim.Muon``'s coefficients ``(3.4445, -4.7750, 2.0315)`` and its
normalisation (divide by the Frobenius norm, clamped at 1e-7; iterate on the
wide orientation). It does not converge to ``U V^T`` exactly: the singular
values of ``O_t`` land in roughly [0.7, 1.2]. ``s`` is the shape factor of
``adjust_lr_fn``: ``None`` (default) is 1, the paper's update;
``"original"`` is ``sqrt(max(1, m / n))`` (the original Muon's, and the
default of ``torch.optim.Muon``); ``"match_rms_adamw"`` is
``0.2 sqrt(max(m, n))`` (Moonshot's). Weight decay is decoupled and applied
before the update with the scheduled ``eta_t``, as ``torch.optim.Muon`` does.

State per matrix: ``step``, the momentum ``exp_avg`` (parameter-shaped) and
``v_sq`` (``v_t^2``, one float32 scalar): one scalar beyond Muon.

**Momentum convention.** ``torch.optim.Muon``'s docstring writes heavy-ball
momentum ``B_t = mu B_{t-1} + G_t``, but its code (torch 2.13,
``buf.lerp_(grad, 1 - momentum)``) keeps the EMA ``(1 - mu)``-weighted form,
the same as AdaGO's ``M_t``. The two differ only by the factor ``1 - mu``,
which Newton-Schulz normalises away. With ``adaptive=False`` (``alpha_t = eta_t``),
``ns_dtype="bfloat16"``, ``nesterov=False`` and the same ``adjust_lr_fn``,
``weight_decay`` and NS settings, AdaGO takes exactly ``torch.optim.Muon``'s
steps (tested bit for bit). ``nesterov=True`` uses Muon's
``G_t + mu (M_t - G_t)`` (``G_t.lerp(M_t, mu)``) as the input to NS.

**Routing (one optimizer object).** Groups whose ``subset_size`` is ``None``
(the coordinate-wise group :func:`snsm.param_groups` builds for embeddings,
norms and biases) are stepped with AdamW (the library's functional
:mod:`snsm.paths`: the fused kernel, foreach or reference path as for the other optimizers; coordinate-wise, bias-corrected, betas
``adamw_betas``, eps ``adamw_eps``, decoupled weight decay after the update).
Such a group that does not set its own ``lr`` gets ``lr = adamw_lr``, so a
learning-rate scheduler drives both parts. Every other group must hold only
matrices (a vector there is a ``ValueError`` naming its shape, as
``torch.optim.Muon`` refuses non-matrices).

**Defaults** (``lr=0.1``, ``gamma=10``, ``v0=1e-2``, ``eps=1e-6``,
``momentum=0.95`` as Muon) come from a small experiment
(``benchmarks/adago_defaults.py``, results in ``benchmarks/adago_defaults.md``):
a 3-layer MLP student fitting a random teacher, 300 steps, 3 seeds, varying one
option at a time, in two settings: clipped to global norm 1.0 (per-matrix
gradient norms ~0.006) and unclipped with 30x targets (norms ~3).

* ``lr``: 0.1-0.2 best in both settings; 0.05 undertrains the unclipped one.
* ``v0``: flat over [1e-3, 1e-1]; ``v0 = 1`` (above the gradient norms) was
  worse in both. ``v0`` only needs to be positive (the first step is then
  defined for a zero gradient) and below the first clipped gradient norm, so
  that ``alpha_1 ~ eta``.
* ``gamma``: inert whenever it exceeds the gradient norms (any value in the
  clipped setting); in the unclipped setting ``gamma <= 1`` (below the norms)
  turns the rule into ``eta / sqrt(t)`` and lost (loss 7.4-10 vs 2.9 at
  ``gamma >= 10``). So ``gamma`` should sit above typical per-matrix
  gradient norms and only clip spikes; 10 does that here. With
  ``clip_grad_norm_(..., 1.0)`` any ``gamma >= 1`` is inert.
* ``eps``: a floor on ``alpha_t`` (not a denominator guard); no effect up to
  1e-3 in 300 steps in either setting. A large floor stops the AdaGrad decay, so it stays tiny.
  It is absolute: a scheduler at ``lr=0`` still moves by ``eps``.

"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Iterable, Optional, Tuple

import torch

from . import paths
from ._base import StrictOptimizer
from ._common import LOW_PRECISION, StepOptions, check_beta, check_state_dtype, compute_dtype, scalar_lr, state_dtype
from . import subspace as sm
from ._dtensor import gather_rows, is_dtensor, local, row_sharding, state_tensor
from .subset_norm import subset_layout

__all__ = ["AdaGO", "newton_schulz", "NS_COEFFICIENTS"]

logger = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic coefficients
NS_EPS = 1e-7  # torch.optim.Muon's clamp on the Frobenius norm before the iteration
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


@functools.lru_cache(maxsize=None)
def bf16_matmul_in_hardware(device_type: str) -> bool:
    """Whether bfloat16 matrix products on this kind of device run on bf16 hardware (a CUDA GPU
    that supports bf16; a CPU with AVX512-BF16 or AMX) rather than through an emulation."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def newton_schulz_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """The Newton-Schulz compute dtype of ``ns_dtype=name`` on ``device`` (``None``: bf16 where it
    runs in hardware, else float32; see :class:`AdaGO`)."""
    if name is not None:
        return NS_DTYPES[name]
    return torch.bfloat16 if bf16_matmul_in_hardware(device.type) else torch.float32


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
) -> torch.Tensor:
    r"""Approximate ``U V^T`` of a matrix ``x = U S V^T`` by the quintic Newton-Schulz iteration.

    Same arithmetic as ``torch.optim.Muon`` (torch 2.13): cast to ``dtype``,
    work on the wide orientation, divide by the Frobenius norm (clamped at
    ``eps``), then ``steps`` times ``A = X X^T;  X <- a X + (b A + c A^2) X``.
    Returns a new tensor of ``x``'s shape in ``dtype``; ``x`` is not modified.
    ``x`` may also be a stack ``(k, m, n)`` of matrices of one shape: one batched
    product per stage for all of them (bit-identical to one call each on CPU).
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"newton_schulz expects a matrix or a stack of matrices, got shape {tuple(x.shape)}")
    a, b, c = coefficients
    y = x.to(dtype, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        y = y.mT
    if y.ndim == 2:
        y.div_(y.norm().clamp(min=eps))
        matmul_add = torch.addmm
    else:
        y.div_(y.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
        matmul_add = torch.baddbmm
    for _ in range(steps):
        gram = y @ y.mT
        poly = matmul_add(gram, gram, gram, beta=b, alpha=c)
        y = matmul_add(y, poly, y, beta=a)
    return y.mT if tall else y


def _shape_factor(fn: Optional[str], m: int, n: int) -> float:
    if fn == "original":
        return math.sqrt(max(1.0, m / n)) if n else 1.0
    if fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def _number(name: str, value, low: float, *, low_open: bool = False, allow_inf: bool = True) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (expected a number)")
    bad = math.isnan(value) or value < low or (low_open and value == low) or (not allow_inf and math.isinf(value))
    if bad:
        bound = f"({low}, {'inf]' if allow_inf else 'inf)'}" if low_open else f"[{low}, {'inf]' if allow_inf else 'inf)'}"
        raise ValueError(f"Invalid {name}: {value} (allowed range {bound})")
    return float(value)


class AdaGO(StrictOptimizer):
    r"""AdaGO: orthogonalized momentum with an AdaGrad-Norm step size; AdamW for the rest.

    See :mod:`snsm.adago` for the update, the routing of non-matrix
    parameters, the momentum convention and how the defaults were chosen.

    Args:
        params: parameters or groups; use ``snsm.param_groups(model)`` so that
            linear weights are orthogonalized and everything else gets AdamW.
        lr: ``eta``, the step-size scale of orthogonalized updates.
        momentum: ``mu`` in ``[0, 1)``, an EMA coefficient.
        gamma: clip on the gradient norm inside the accumulator, ``(0, inf]``.
        eps: floor on the step size ``alpha_t``, ``[0, inf)``.
        v0: initial ``v`` (``v_0^2`` starts the accumulator), ``(0, inf)``.
        weight_decay: decoupled, ``W <- (1 - eta_t lambda) W``.
        nesterov: feed ``G_t.lerp(M_t, mu)`` to Newton-Schulz (Muon's Nesterov).
        ns_steps: Newton-Schulz iterations, ``[1, 99]``.
        ns_coefficients: the quintic's ``(a, b, c)``.
        ns_dtype: ``None`` (default): ``"bfloat16"`` (Muon's choice) where the
            parameter's device multiplies bf16 in hardware (CUDA; CPUs with
            AVX512-BF16 or AMX), else ``"float32"``: elsewhere a bf16 product
            is emulated, and one Newton-Schulz product of a 32000 x 256 head
            (``256 x 256`` by ``256 x 32000``) took 3.2 s in bf16 against 45 ms in
            float32 on an AVX2 CPU. Or ``"bfloat16"`` / ``"float32"`` always.
        adaptive: ``False`` replaces ``alpha_t`` by ``eta_t`` (Muon's constant
            step; the accumulator is then not updated).
        adjust_lr_fn: ``None`` (paper), ``"original"`` or ``"match_rms_adamw"``
            (torch.optim.Muon's shape factors).
        rank: ``None`` (full momentum) or ``r``: each orthogonalized matrix keeps its momentum in a
            rank-r subspace (Subspace-Momentum: ``N = back(M) + G - back(R)``, ``R`` the
            gradient's projection, ``M`` its EMA) and Newton-Schulz orthogonalizes ``N``; the
            basis is the gradient's top-r singular subspace, recomputed every ``proj_gap`` steps,
            the momentum carried across by ``refresh`` (``"transport"``, ``"reset"``,
            ``"reference"``). State per matrix: ``max(m, n) r`` instead of ``m n``.
        adamw_lr: ``lr`` of ``subset_size=None`` groups that do not set one.
        adamw_betas, adamw_eps: AdamW's for those groups.
        maximize: ascend instead of descend (torch's convention: the gradient is negated).
        state_dtype: as in the other snsm optimizers (``None``: float32 for
            bf16/fp16 parameters, else the parameter's dtype). ``v_sq`` is
            always float32.
    """

    CPU_STATE = ("step", "proj_step")

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        momentum: float = 0.95,
        gamma: float = 10.0,
        eps: float = 1e-6,
        v0: float = 1e-2,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        ns_steps: int = 5,
        ns_coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
        ns_dtype: Any = None,
        adaptive: bool = True,
        adjust_lr_fn: Optional[str] = None,
        adamw_lr: float = 3e-3,
        adamw_betas: Tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        subset_size: Optional[str] = "auto",
        rank: Optional[int] = None,
        proj_gap: int = 200,
        refresh: str = "transport",
        state_dtype: Optional[str] = None,
        maximize: bool = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, gamma=gamma, eps=eps, v0=v0, weight_decay=weight_decay,
            nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients) if isinstance(
                ns_coefficients, (list, tuple)) else ns_coefficients,
            ns_dtype=ns_dtype, adaptive=adaptive, adjust_lr_fn=adjust_lr_fn, adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, (list, tuple)) else adamw_betas,
            adamw_eps=adamw_eps, subset_size=subset_size, rank=rank, proj_gap=proj_gap, refresh=refresh,
            state_dtype=state_dtype, maximize=maximize,
        )
        _number("adamw_lr", adamw_lr, 0.0)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- validation
    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        if param_group.get("subset_size", self.defaults["subset_size"]) is None and "lr" not in param_group:
            param_group["lr"] = self.defaults["adamw_lr"]
        super().add_param_group(param_group)

    def normalize_group(self, group: dict) -> None:
        super().normalize_group(group)
        value = group["ns_dtype"]
        if isinstance(value, torch.dtype):
            names = {v: k for k, v in NS_DTYPES.items()}
            if value not in names:
                raise ValueError(f"Invalid ns_dtype: {value} (allowed: {', '.join(NS_DTYPES)})")
            group["ns_dtype"] = names[value]
        for key in ("ns_coefficients", "adamw_betas"):
            if isinstance(group[key], list):
                group[key] = tuple(group[key])

    def check_param(self, p: torch.Tensor, group: dict) -> None:
        super().check_param(p, group)
        if is_dtensor(p) and group.get("rank", self.defaults["rank"]) is not None and self._orthogonal(group):
            raise ValueError("AdaGO with rank (subspace momentum) does not take row-sharded (FSDP2) parameters "
                             "yet; use rank=None under FSDP2")
        if self._orthogonal(group) and p.ndim < 2:
            raise ValueError(
                f"AdaGO orthogonalizes matrices, but a parameter of shape {tuple(p.shape)} is in a group "
                f"with subset_size={group['subset_size']!r}: put vectors and scalars in a group with "
                "subset_size=None (AdamW); snsm.param_groups(model) does"
            )

    @staticmethod
    def _orthogonal(group: dict) -> bool:
        return group["subset_size"] is not None

    def validate_group(self, group: dict) -> None:
        _number("lr", group["lr"], 0.0)
        _number("weight_decay", group["weight_decay"], 0.0)
        size = group["subset_size"]
        if size is not None and size != "auto":
            raise ValueError(
                f"Invalid subset_size: {size!r}: in AdaGO it routes a group (allowed: 'auto' = orthogonalized "
                "matrices, None = AdamW)"
            )
        sm.validate_options(group["rank"], group["proj_gap"], group["refresh"])
        check_state_dtype(group["state_dtype"])
        betas = group["adamw_betas"]
        if not isinstance(betas, tuple) or len(betas) != 2:
            raise ValueError(f"Invalid adamw_betas: {betas!r} (expected a pair (beta1, beta2))")
        check_beta("adamw_betas[0]", betas[0])
        check_beta("adamw_betas[1]", betas[1])
        _number("adamw_eps", group["adamw_eps"], 0.0, allow_inf=False)
        if not self._orthogonal(group):
            return
        check_beta("momentum", group["momentum"])
        _number("gamma", group["gamma"], 0.0, low_open=True)
        _number("eps", group["eps"], 0.0, allow_inf=False)
        _number("v0", group["v0"], 0.0, low_open=True, allow_inf=False)
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 99:
            raise ValueError(f"Invalid ns_steps: {steps!r} (allowed: an int in [1, 99])")
        coeffs = group["ns_coefficients"]
        if not isinstance(coeffs, tuple) or len(coeffs) != 3 or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coeffs):
            raise ValueError(f"Invalid ns_coefficients: {coeffs!r} (expected three finite numbers (a, b, c))")
        if group["ns_dtype"] is not None and group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (allowed: None, {', '.join(NS_DTYPES)})")
        for key in ("nesterov", "adaptive"):
            if not isinstance(group[key], bool):
                raise TypeError(f"Invalid {key}: {group[key]!r} (expected True or False)")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r} (allowed: None, 'original', 'match_rms_adamw')"
            )

    # ---------------------------------------------------------------- state
    def _subspace(self, p: torch.Tensor, group: dict) -> Optional[sm.Subspace]:
        """The rank-r momentum subspace of an orthogonalized matrix (``rank`` set and below
        ``min(m, n)``), or ``None``: full momentum. Refreshed by ``svd`` of the gradient every
        ``proj_gap`` steps (synchronized), the momentum carried by ``refresh``."""
        rank = group["rank"]
        if rank is None or not self._orthogonal(group) or p.ndim < 2:
            return None
        shape = (p.shape[0], p.numel() // p.shape[0])
        if rank >= min(shape):
            return None
        return sm.Subspace(shape, rank, "svd", group["proj_gap"], group["refresh"])

    def state_spec(self, p: torch.Tensor, group: dict) -> dict:
        dtype = state_dtype(p, group["state_dtype"])
        spec = {"exp_avg": (tuple(p.shape), dtype)}
        sub = self._subspace(p, group)
        if sub is not None:
            m, n = sub.shape
            spec["exp_avg"] = (sm.momentum_shape(m, n, sub.rank, sub.proj), dtype)
            spec["proj"] = (sm.projector_shape(m, n, sub.rank, sub.proj), torch.float32)
        if self._orthogonal(group):
            spec["v_sq"] = ((), torch.float32)
        else:
            spec["exp_avg_sq"] = (tuple(p.shape), dtype)
        return spec

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        sharded = is_dtensor(p)
        for key, (shape, dtype) in self.state_spec(p, group).items():
            if sharded and shape:  # parameter-shaped: sharded by rows like it (FSDP2)
                state[key] = state_tensor(p, shape, dtype, sharded_rows=True)
            else:  # the scalar v_sq: identical on every rank
                state[key] = torch.zeros(shape, dtype=dtype, device=local(p).device)
        if "v_sq" in state:
            state["v_sq"].fill_(float(group["v0"]) ** 2)
        if "proj" in state:
            state["proj_step"] = torch.tensor(0, dtype=torch.int64)

    def counters(self, p: torch.Tensor, group: dict) -> tuple:
        return ("step", "proj_step") if self._subspace(p, group) is not None else ("step",)

    # ---------------------------------------------------------------- step
    def prepare_step(self):
        """Every group validated, every gradient and piece of state checked: nothing written."""
        plan = []
        index = -1
        for group in self.param_groups:
            self.validate_group(group)
            params = []
            for p in group["params"]:
                index += 1
                if not self.pending(p):
                    continue
                self.check_grad(p)
                if self._orthogonal(group) and p.ndim < 2:
                    raise ValueError(f"AdaGO orthogonalizes matrices; got a parameter of shape {tuple(p.shape)}")
                self.check_state(p, group, "was the parameter moved between the orthogonalized and the AdamW groups?")
                params.append((p, index))
            plan.append((group, params))
        return plan

    def apply_step(self, plan) -> None:
        adamw = []  # the AdamW groups' parameters, on the library's paths (fused, foreach, sharded, reference)
        stacks = {}  # matrices of one shape and Newton-Schulz setting: orthogonalized in one batched call
        for batch, (group, params) in enumerate(plan):
            for p, index in params:
                if not self.state[p]:
                    self._init_state(p, group)
                if not self._orthogonal(group):
                    adamw.append(self._adamw_entry(p, p.grad, group, index, batch))
                elif is_dtensor(p):  # a row shard: gathers its update, orthogonalizes it on its own
                    self._orthogonal_step(p, group, self.gradient(p, group))
                else:
                    work = self._momentum(p, group, self.gradient(p, group))
                    key = (work[2].shape, work[2].device, newton_schulz_dtype(group["ns_dtype"], p.device),
                           group["ns_steps"], group["ns_coefficients"])
                    stacks.setdefault(key, []).append((p, group, work))
        for (_, _, dtype, steps, coefficients), items in stacks.items():
            updates = [update for _, _, (_, _, update, _) in items]
            ortho = newton_schulz(updates[0] if len(updates) == 1 else torch.stack(updates), steps, coefficients, dtype)
            for i, (p, group, work) in enumerate(items):
                self._apply_orthogonal(p, group, work, ortho if len(updates) == 1 else ortho[i])
        if adamw:
            paths.run_steps(adamw, scratch={})

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One parameter's step with ``grad`` (a step in backward), validated first."""
        owner = self.owner(p)
        if owner is None:
            raise ValueError(f"AdaGO: the parameter of shape {tuple(p.shape)} is not in any group")
        group, index = owner
        self.validate_group(group)
        self.check_grad(p, grad)
        self.check_state(p, group, "was the parameter moved between the orthogonalized and the AdamW groups?")
        if not self.state[p]:
            self._init_state(p, group)
        if self._orthogonal(group):
            self._orthogonal_step(p, group, self.gradient(p, group, grad))
        else:
            paths.run_steps([self._adamw_entry(p, grad, group, index, 0)], scratch={})
        self.stepped_in_backward(p)

    def _adamw_entry(self, p: torch.Tensor, grad: torch.Tensor, group: dict, index: int, batch: int) -> tuple:
        """``p``'s AdamW step as :func:`snsm.paths.run_steps` takes it: coordinate-wise, bias-corrected,
        low-precision state written back with stochastic rounding."""
        beta1, beta2 = group["adamw_betas"]
        dtype = state_dtype(p, group["state_dtype"])
        options = StepOptions(beta1=beta1, beta2=beta2, eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                              bias_correction=True, layout=subset_layout(p.shape, None), subspace=None,
                              warn=self.warn_once, rounding_seed=index if dtype in LOW_PRECISION else None)
        state = self.state[p]
        path = paths.choose_path(p, state, options, dtype, fused=None, foreach=None, grad=grad)
        return (path, p, self.gradient(p, group, grad), state, group["lr"], paths.prepare_options(p, path, options),
                batch)

    def step_size(self, group: dict, grad: torch.Tensor, state: dict):
        r"""``alpha_t`` for one matrix; updates the accumulator ``v_sq`` in place.

        The hook a subclass overrides to try another step-size rule. Returns
        ``eta_t`` when ``adaptive=False``, else a 0-d float32 tensor
        ``max(eps, eta_t min(||G_t||, gamma) / v_t)`` with
        ``v_t^2 = v_{t-1}^2 + min(||G_t||^2, gamma^2)``.
        """
        lr = scalar_lr(group["lr"])
        if not group["adaptive"]:
            return lr
        v_sq = state["v_sq"]
        sq = grad.float().square().sum()
        if is_dtensor(sq):  # a sharded gradient: its ranks' partial sums, all-reduced
            sq = sq.full_tensor()
        clipped = sq.clamp(max=float(group["gamma"]) ** 2)
        v_sq.add_(clipped)
        alpha = clipped.sqrt().div(v_sq.sqrt()).mul(lr.to(v_sq.device) if torch.is_tensor(lr) else lr)
        return alpha.clamp(min=float(group["eps"]))

    def _momentum(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> tuple:
        """The momentum update of one matrix: ``(g, work, update, buf)``, ``update`` the ``(m, n)`` matrix
        (this rank's rows of it for a row shard) that Newton-Schulz orthogonalizes."""
        state = self.state[p]
        state["step"] += 1
        compute = compute_dtype(p)
        g = local(grad).to(compute)
        buf = local(state["exp_avg"])
        work = buf if buf.dtype == compute else buf.to(compute)
        mu = float(group["momentum"])
        rows = g.shape[0] if g.ndim else 1
        sub = self._subspace(p, group)
        if sub is not None:  # the momentum in the subspace; its complement takes the gradient as it is
            a = sm.tall(g.reshape(sub.shape), sub.is_tall)
            mom = sm.tall(work, sub.is_tall)
            replaced = sm.refresh_projector(state, g.reshape(sub.shape), mom, sub, int(state["step"]), self.warn_once)
            r = sm.project(a, state["proj"])
            mom.lerp_(r, 1.0 - mu)
            kept = r.lerp(mom, mu) if group["nesterov"] else mom
            update = sm.tall(sm.numerator(a, kept, r, state["proj"]), sub.is_tall)
            if replaced and sub.refresh == "reference":
                mom.zero_()
            return g, work, update.reshape(rows, g.numel() // rows), buf
        work.lerp_(g, 1.0 - mu)
        update = g.lerp(work, mu) if group["nesterov"] else work
        return g, work, update.reshape(rows, g.numel() // rows if rows else 0), buf

    def _orthogonal_step(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        """One step for one matrix. A row-sharded (FSDP2) matrix keeps its momentum sharded and
        all-gathers only the update it orthogonalizes (Newton-Schulz needs the whole matrix); every
        rank computes the same orthogonal matrix and applies its own rows."""
        work = self._momentum(p, group, grad)
        update = work[2]
        dtype = newton_schulz_dtype(group["ns_dtype"], update.device)
        if is_dtensor(p):
            shard = row_sharding(p)
            whole = gather_rows(update, shard)
            ortho = newton_schulz(whole, group["ns_steps"], group["ns_coefficients"], dtype)
            ortho = ortho[shard.start: shard.start + shard.count]
        else:
            ortho = newton_schulz(update, group["ns_steps"], group["ns_coefficients"], dtype)
        self._apply_orthogonal(p, group, work, ortho, grad if is_dtensor(p) else None)

    def _apply_orthogonal(self, p: torch.Tensor, group: dict, work: tuple, ortho: torch.Tensor,
                          norm_grad: Optional[torch.Tensor] = None) -> None:
        """``W <- (1 - eta lambda) W - s alpha_t O_t`` with ``O_t`` = ``ortho`` (this rank's rows), and the
        momentum written back. ``norm_grad``: the (sharded) gradient whose norm feeds ``alpha_t``."""
        g, work_t, _, buf = work
        state = self.state[p]
        m = p.shape[0]
        n = p.numel() // m if m else 0
        ortho = ortho.reshape(g.shape)
        alpha = self.step_size(group, g if norm_grad is None else norm_grad, state)
        p = local(p)
        lr = scalar_lr(group["lr"])
        wd = float(group["weight_decay"])
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        scale = _shape_factor(group["adjust_lr_fn"], m, n)
        if torch.is_tensor(alpha):
            p.sub_((ortho.to(alpha.dtype) * (alpha * scale).to(ortho.device)).to(p.dtype))
        else:
            p.add_(ortho, alpha=-alpha * scale)  # torch.optim.Muon's exact arithmetic
        if work_t is not buf:
            buf.copy_(work_t)
