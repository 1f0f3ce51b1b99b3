r"""The optimizer shell shared by every Subset-Norm / Subspace-Momentum variant.

A variant (see :mod:`snsm.variants`) only says which rules it combines, as a
:class:`Rules` tuple per parameter group; this module validates options,
creates state in a fixed layout and applies the update

.. math::

    W \leftarrow W - \eta_t\, c_t\, \frac{N_t}{\sqrt{v_t} + \epsilon},
    \qquad W \leftarrow W - \eta_t \lambda W

where ``N_t`` is the momentum rule's numerator (the gradient, a full EMA, or
a subspace EMA plus the gradient's orthogonal complement, see
:mod:`snsm.subspace`), ``v_t`` the Subset-Norm accumulator broadcast over each
subset (:mod:`snsm.subset_norm`; absent for SGD), ``c_t`` the Adam bias
correction ``sqrt(1 - beta2^t) / (1 - beta1^t)`` (or 1) and the last step is
decoupled weight decay, applied after the update as in the reference code.

State per parameter (tensors only, so ``torch.load(weights_only=True)`` and
Distributed Checkpoint round-trip it):

``step``        float32 CPU scalar, the number of steps taken (as torch.optim)
``exp_avg``     momentum: parameter-shaped, or the rank-r subspace momentum
``exp_avg_sq``  Subset-Norm accumulator, one value per subset
``proj``        subspace projector: float32 basis ``min(m,n) x r`` or int64 rows ``r``
``proj_step``   int64 CPU scalar: step at which ``proj`` was computed (0: not yet)
``seed``        int64 CPU scalar: RNG stream of random projectors

Non-finite gradients are not filtered (as in ``torch.optim.AdamW``): a NaN or
inf gradient passed to :meth:`step` propagates into the momentum and the
accumulator. Use ``torch.amp.GradScaler`` (which skips the step) or
``clip_grad_norm_(..., error_if_nonfinite=True)``. A projector refresh on a
non-finite or all-zero gradient keeps the previous basis instead.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, NamedTuple, Optional

import torch

from . import paths
from . import subspace as sm
from ._base import StrictOptimizer
from ._common import LOW_PRECISION, StepOptions, check_range, check_state_dtype, state_dtype
from ._dtensor import is_dtensor, rows_local, state_tensor
from .subset_norm import SubsetLayout, subset_layout, validate_subset_size

__all__ = ["Rules", "SubsetNormOptimizer"]

_RANDOM_PROJECTIONS = ("randomized", "srht", "uniform")


class Rules(NamedTuple):
    """Which rules a parameter group combines.

    ``beta1``: EMA momentum coefficient (0: no momentum state); ``beta2``:
    second-moment rule (``None``: none, i.e. SGD; ``1.0``: AdaGrad sum;
    ``< 1``: EMA); ``bias_correction``: multiply by
    ``sqrt(1 - beta2^t) / (1 - beta1^t)``; ``subspace``: whether ``rank``
    puts the momentum of matrices into a subspace; ``per_tensor``: one
    Subset-Norm subset per tensor in groups that are not coordinate-wise
    (AdaGrad-Norm, RMSprop-Norm) instead of the group's ``subset_size``.
    """

    beta1: float
    beta2: Optional[float]
    bias_correction: bool
    subspace: bool
    per_tensor: bool = False


class SubsetNormOptimizer(StrictOptimizer):
    """Base shell: subclasses define :meth:`rules` (and their constructor's defaults).

    Group options understood by the shell: ``lr``, ``eps``, ``weight_decay``,
    ``subset_size``, ``rank``, ``proj``, ``proj_gap``, ``refresh``, ``seed``,
    ``state_dtype``, ``stochastic_rounding`` (low-precision state is written
    back with stochastic rounding, see :mod:`snsm.rounding`; ``False``: round to
    nearest), ``stagger`` (spread projector refreshes of different
    matrices over the gap), ``fused`` (``None``: the fused kernel where it applies;
    ``True``: require it; ``False``: never), ``foreach`` (``None``: the multi-tensor
    path, :mod:`snsm.foreach`, for non-CPU tensors the fused kernel does not take,
    as torch.optim; ``True``: for every tensor it takes, instead of the kernel;
    ``False``: never). ``fused=False, foreach=False``
    is the for-loop reference path (:mod:`snsm.paths` chooses); ``maximize``
    (ascend: the gradient is negated, as torch.optim). Variant options
    (``betas``, ``momentum``, ``alpha``) are read by the variant's :meth:`rules`.
    """

    CPU_STATE = ("step", "proj_step", "seed")

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        defaults = dict(defaults)
        defaults.setdefault("subset_size", "auto")
        defaults.setdefault("rank", None)
        defaults.setdefault("proj", "svd")
        defaults.setdefault("proj_gap", 200)
        defaults.setdefault("refresh", "transport")
        defaults.setdefault("seed", 0)
        defaults.setdefault("state_dtype", None)
        defaults.setdefault("eps", 1e-8)
        defaults.setdefault("weight_decay", 0.0)
        defaults.setdefault("fused", None)
        defaults.setdefault("foreach", None)
        defaults.setdefault("stagger", None)
        defaults.setdefault("stochastic_rounding", True)
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        super()._init_caches()
        self._scratch: dict = {}
        self._plans: dict = {}  # param -> (key, (path, options)), see _planned
        self._rules: dict = {}  # id(group) -> (group, _group_key(group), rules), see _validated

    # ---------------------------------------------------------------- variant hook
    def rules(self, group: dict) -> Rules:  # pragma: no cover - abstract
        """The rules this variant applies to ``group`` (validating its options)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- validation
    def validate_group(self, group: dict) -> Rules:
        check_range("lr", group["lr"], 0.0)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        validate_subset_size(group["subset_size"])
        rank = group["rank"]
        sm.validate_options(rank, group["proj_gap"], group["refresh"], group["proj"])
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise TypeError(f"Invalid seed: {group['seed']!r} (expected an int)")
        if group["stagger"] not in (None, True, False):
            raise ValueError(f"Invalid stagger: {group['stagger']!r} (allowed: None, True, False)")
        if group["stochastic_rounding"] not in (True, False):
            raise ValueError(f"Invalid stochastic_rounding: {group['stochastic_rounding']!r} (allowed: True, False)")
        if group["fused"] not in (None, True, False):
            raise ValueError(f"Invalid fused: {group['fused']!r} (allowed: None for the fastest path, True, False)")
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"Invalid foreach: {group['foreach']!r} (allowed: None for the fastest path, True, False)")
        if group["fused"] and group["foreach"]:
            raise ValueError("Invalid fused=True with foreach=True: pick one path (as torch.optim)")
        check_state_dtype(group["state_dtype"])
        rules = self.rules(group)
        if rank is not None and not (rules.subspace and rules.beta1 > 0):
            raise ValueError(
                f"Invalid rank: {rank!r}: {type(self).__name__} keeps no subspace momentum "
                "(use the SM variant, or rank=None)"
            )
        return rules

    def rules_record(self, group: dict) -> list:
        """The rules the group's state is written under, as a checkpoint records them:
        ``[beta1, beta2, bias_correction, subspace momentum in use, per_tensor]``."""
        rules = self.rules(group)
        return [rules.beta1, rules.beta2, rules.bias_correction,
                bool(rules.subspace and rules.beta1 > 0 and group["rank"] is not None), rules.per_tensor]

    # ---------------------------------------------------------------- layout
    def layout(self, p: torch.Tensor, group: dict, rules: Rules) -> Optional[SubsetLayout]:
        """The Subset-Norm partition of ``p`` in ``group`` (``None`` without a second moment)."""
        if rules.beta2 is None:
            return None
        if rules.per_tensor and group["subset_size"] is not None and p.numel():
            return SubsetLayout(view=(1, p.numel()), dim=1, state_shape=(1, 1))
        layout = subset_layout(p.shape, group["subset_size"])
        if layout.degraded:
            self.warn_once(
                f"divisor{tuple(p.shape)}{group['subset_size']}",
                f"subset_size={group['subset_size']!r} on a parameter of shape {tuple(p.shape)} "
                f"(numel {p.numel()}): the largest divisor of numel <= {layout.target} is {layout.length}, "
                "far below the target; that parameter is close to coordinate-wise",
            )
        return layout

    def subspace(self, p: torch.Tensor, group: dict, rules: Rules, index: int = 0) -> Optional[sm.Subspace]:
        """How ``p`` (the ``index``-th parameter of the optimizer) keeps subspace momentum, or ``None``."""
        rank = group["rank"]
        if rank is None or not rules.subspace or rules.beta1 == 0 or p.ndim < 2:
            return None
        shape = (p.shape[0], p.numel() // p.shape[0]) if p.numel() else (p.shape[0], 0)
        if rank >= min(shape):
            self.warn_once(
                f"rank{tuple(p.shape)}{rank}",
                f"rank={rank} >= min{shape} for a parameter of shape {tuple(p.shape)}: "
                "using full momentum for it",
            )
            return None
        gap = group["proj_gap"]
        # staggered: spread the matrices' refreshes over the gap (golden-ratio sequence of
        # their positions), so no step recomputes every basis at once
        # (None: staggered, except refresh="reference", which keeps the authors' synchronized schedule)
        stagger = group["stagger"] if group["stagger"] is not None else group["refresh"] != "reference"
        offset = int(((index * 0.6180339887498949) % 1.0) * gap) if stagger else 0
        return sm.Subspace(shape, rank, group["proj"], gap, group["refresh"], offset)

    def state_spec(self, p, group, rules: Optional[Rules] = None) -> Dict[str, tuple]:
        """Key -> (shape, dtype) of the tensors a parameter's state holds (beside ``step``)."""
        rules = rules if rules is not None else self.rules(group)
        dtype = state_dtype(p, group["state_dtype"])
        spec = {}
        sub = self.subspace(p, group, rules)
        if sub is not None:
            m, n = sub.shape
            spec["exp_avg"] = (sm.momentum_shape(m, n, sub.rank, sub.proj), dtype)
            dense = sub.proj in sm.DENSE_PROJECTIONS
            spec["proj"] = (sm.projector_shape(m, n, sub.rank, sub.proj), torch.float32 if dense else torch.int64)
        elif rules.beta1 > 0:
            spec["exp_avg"] = (tuple(p.shape), dtype)
        layout = self.layout(p, group, rules)
        if layout is not None:
            spec["exp_avg_sq"] = (layout.state_shape, dtype)
        return spec

    def _init_state(self, p, group, rules, index: int) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        sharded = is_dtensor(p)
        for key, (shape, dtype) in self.state_spec(p, group, rules).items():
            if sharded:  # shard by the parameter's rows what is laid out by its rows
                state[key] = state_tensor(p, shape, dtype, self._rows_sharded(p, group, rules, key))
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        if "proj" in state:
            state["proj_step"] = torch.tensor(0, dtype=torch.int64)
            if group["proj"] in _RANDOM_PROJECTIONS:
                state["seed"] = torch.tensor(sm.next_seed(group["seed"] * 1_000_003 + index), dtype=torch.int64)

    def counters(self, p: torch.Tensor, group: dict) -> tuple:
        if "proj" not in self.state_spec(p, group):
            return ("step",)
        return ("step", "proj_step", "seed") if group["proj"] in _RANDOM_PROJECTIONS else ("step", "proj_step")

    def _rows_sharded(self, p, group, rules, key: str) -> bool:
        """Whether state ``key`` of a row-sharded parameter is laid out by the parameter's rows."""
        if key == "proj":
            return False
        if key == "exp_avg_sq":
            return rows_local(self.layout(p, group, rules), p.numel() // max(1, p.shape[0]) if p.ndim else 1)
        sub = self.subspace(p, group, rules)
        if sub is None:  # full momentum
            return True
        dense = sub.proj in sm.DENSE_PROJECTIONS
        return dense == sub.is_tall  # m x r momentum: dense basis of a tall matrix, or columns of a wide one

    # ---------------------------------------------------------------- step
    def prepare_step(self):
        """Every group validated, every gradient checked, every parameter's path planned: nothing written."""
        plan = []
        index = -1  # a parameter's place among all groups' parameters (its seed, its plan)
        for group in self.param_groups:
            group_key = _group_key(group)
            rules = self._validated(group, group_key)
            params = []
            for p in group["params"]:
                index += 1
                if not self.pending(p):
                    continue
                self.check_grad(p)
                params.append((p, index, *self._planned(p, p.grad, group, rules, group_key, index)))
            plan.append((group, rules, params))
        return plan

    def apply_step(self, plan) -> None:
        steps = [self._entry(p, p.grad, group, rules, index, path, options, batch)
                 for batch, (group, rules, params) in enumerate(plan) for p, index, path, options in params]
        paths.run_steps(steps, scratch=self._scratch)

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One parameter's step with ``grad`` (a step in backward): validated, then the same path and
        arithmetic as in an ordinary step."""
        owner = self.owner(p)
        if owner is None:
            raise ValueError(f"{type(self).__name__}: the parameter of shape {tuple(p.shape)} is not in any group")
        group, index = owner
        group_key = _group_key(group)
        rules = self._validated(group, group_key)
        self.check_grad(p, grad)
        path, options = self._planned(p, grad, group, rules, group_key, index)
        paths.run_steps([self._entry(p, grad, group, rules, index, path, options, 0)], scratch=self._scratch)
        self.stepped_in_backward(p)

    def _entry(self, p, grad, group, rules, index, path, options, batch) -> tuple:
        """``p``'s entry for :func:`snsm.paths.run_steps` (its state created on its first step)."""
        if not self.state[p]:
            self._init_state(p, group, rules, index)
        return (path, p, self.gradient(p, group, grad), self.state[p], group["lr"], options, batch)

    def _validated(self, group: dict, group_key: tuple) -> Rules:
        """:meth:`validate_group`, again only when the group's options (``_group_key``) change; the
        learning rate, which schedulers change at every step, is checked every time."""
        hit = self._rules.get(id(group))
        if hit is not None and hit[0] is group and hit[1] == group_key:
            check_range("lr", group["lr"], 0.0)
            return hit[2]
        rules = self.validate_group(group)
        self._rules[id(group)] = (group, group_key, rules)
        return rules

    def _planned(self, p: torch.Tensor, grad: torch.Tensor, group: dict, rules: Rules, group_key: tuple, index: int):
        """``(path, StepOptions)`` for ``p``, checked and computed again only when something
        that decides them changes (the group's options, the parameter's place, shape, dtype, device or
        layout, the gradient's dtype or layout, whether state exists); cleared by ``load_state_dict``."""
        compiling = torch.compiler.is_compiling()  # traced: never the fused kernel, never a cache entry
        key = (group_key, index, p.shape, p.dtype, p.device, p.is_contiguous(), grad.dtype, grad.is_contiguous(),
               bool(self.state.get(p)), compiling)
        hit = self._plans.get(p)
        if hit is not None and hit[0] == key:
            return hit[1]
        self.check_state(p, group, "were subset_size/rank/proj changed after the first step?")
        dtype = state_dtype(p, group["state_dtype"])
        rounding = group["stochastic_rounding"] and dtype in LOW_PRECISION
        options = StepOptions(
            beta1=rules.beta1,
            beta2=rules.beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=rules.bias_correction,
            layout=self.layout(p, group, rules),
            subspace=self.subspace(p, group, rules, index),
            warn=self.warn_once,
            rounding_seed=group["seed"] * 1_000_003 + index if rounding else None,
        )
        path = paths.choose_path(p, self.state.get(p) or {}, options, dtype, fused=group["fused"],
                                 foreach=group["foreach"], grad=grad)
        planned = (path, paths.prepare_options(p, path, options))
        if not compiling:
            self._plans[p] = (key, planned)
        return planned

    # ---------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()
        self._rules.clear()


def _group_key(group: dict) -> tuple:
    """A group's options but its parameters and lr, hashable (what a cached plan depends on)."""
    items = []
    for key, value in group.items():
        if key in ("params", "lr"):
            continue
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        items.append((key, value))
    return tuple(items)
