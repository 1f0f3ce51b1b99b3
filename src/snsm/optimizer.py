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

import logging
import math
import warnings
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional

import torch
from torch.optim import Optimizer

from . import distributed, foreach, fused
from . import subspace as sm
from ._kernels import unavailable_reason as kernel_error
from .rounding import rounding_generator, stochastic_round_
from .subset_norm import SubsetLayout, accumulate_, divide_by_root, subset_layout, validate_subset_size
from .weight_decay import decoupled_weight_decay_

__all__ = ["Rules", "SubsetNormOptimizer", "STATE_DTYPES"]

logger = logging.getLogger(__name__)

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_RANDOM_PROJECTIONS = ("randomized", "srht", "uniform")


class Rules(NamedTuple):
    """Which rules a parameter group combines.

    ``beta1``: EMA momentum coefficient (0: no momentum state); ``beta2``:
    second-moment rule (``None``: none, i.e. SGD; ``1.0``: AdaGrad sum;
    ``< 1``: EMA); ``bias_correction``: multiply by
    ``sqrt(1 - beta2^t) / (1 - beta1^t)``; ``subspace``: whether ``rank``
    puts the momentum of matrices into a subspace.
    """

    beta1: float
    beta2: Optional[float]
    bias_correction: bool
    subspace: bool


class _Subspace(NamedTuple):
    shape: tuple  # (m, n) matrix view
    rank: int
    proj: str
    gap: int
    refresh: str
    offset: int = 0  # refresh when (step + offset) % gap == 0

    @property
    def is_tall(self) -> bool:
        return self.shape[0] >= self.shape[1]


def _check_range(name: str, value, low: float, high: float = math.inf, high_open: bool = False) -> None:
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


def check_beta(name: str, value, allow_one: bool = False) -> float:
    """Validate a momentum/EMA coefficient: ``[0, 1)``, or ``[0, 1]`` when ``allow_one``."""
    _check_range(name, value, 0.0, 1.0, high_open=not allow_one)
    return float(value)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    import sys

    package = __name__.rsplit(".", 1)[0]
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_globals.get("__name__", "").startswith(package)
                                 or frame.f_globals.get("__name__", "").startswith("torch")):
        frame, level = frame.f_back, level + 1
    return level


def _state_dtype(param: torch.Tensor, group: dict) -> torch.dtype:
    name = group.get("state_dtype")
    if name is not None:
        return STATE_DTYPES[name]
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


class SubsetNormOptimizer(Optimizer):
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
    is the for-loop reference path. Variant options (``betas``, ``momentum``, ``alpha``) are
    read by the variant's :meth:`rules`.
    """

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
        self._warned: set = set()
        self._scratch: dict = {}
        self._plans: dict = {}  # param -> (key, (path, options)), see _planned
        self._rules: dict = {}  # id(group) -> (group, _group_key(group), rules), see _validated
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- variant hook
    def rules(self, group: dict) -> Rules:  # pragma: no cover - abstract
        """The rules this variant applies to ``group`` (validating its options)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- validation
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
                if not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__} needs floating-point parameters (got {p.dtype})")
            dtype = group.get("state_dtype")
            if isinstance(dtype, torch.dtype):
                names = {v: k for k, v in STATE_DTYPES.items()}
                if dtype not in names:
                    raise ValueError(f"Invalid state_dtype: {dtype} (allowed: None, {', '.join(STATE_DTYPES)})")
                group["state_dtype"] = names[dtype]
            self._validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict) -> Rules:
        _check_range("lr", group["lr"], 0.0)
        _check_range("eps", group["eps"], 0.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        validate_subset_size(group["subset_size"])
        rank = group["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"Invalid rank: {rank!r} (allowed: None for full momentum, or an int >= 1)")
        if group["proj"] not in sm.PROJECTIONS:
            raise ValueError(f"Invalid proj: {group['proj']!r} (allowed: {', '.join(sm.PROJECTIONS)})")
        gap = group["proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"Invalid proj_gap: {gap!r} (allowed: an int >= 1)")
        if group["refresh"] not in sm.REFRESH_POLICIES:
            raise ValueError(f"Invalid refresh: {group['refresh']!r} (allowed: {', '.join(sm.REFRESH_POLICIES)})")
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
        if group["state_dtype"] is not None and group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {group['state_dtype']!r} (allowed: None, {', '.join(STATE_DTYPES)})")
        rules = self.rules(group)
        if rank is not None and not (rules.subspace and rules.beta1 > 0):
            raise ValueError(
                f"Invalid rank: {rank!r}: {type(self).__name__} keeps no subspace momentum "
                "(use the SM variant, or rank=None)"
            )
        return rules

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())

    # ---------------------------------------------------------------- layout
    def _layout(self, p: torch.Tensor, group: dict, rules: Rules) -> Optional[SubsetLayout]:
        if rules.beta2 is None:
            return None
        layout = subset_layout(p.shape, group["subset_size"])
        if layout.degraded:
            self._warn_once(
                f"divisor{tuple(p.shape)}{group['subset_size']}",
                f"subset_size={group['subset_size']!r} on a parameter of shape {tuple(p.shape)} "
                f"(numel {p.numel()}): the largest divisor of numel <= {layout.target} is {layout.length}, "
                "far below the target; that parameter is close to coordinate-wise",
            )
        return layout

    def _subspace(self, p: torch.Tensor, group: dict, rules: Rules, index: int = 0) -> Optional[_Subspace]:
        rank = group["rank"]
        if rank is None or not rules.subspace or rules.beta1 == 0 or p.ndim < 2:
            return None
        shape = (p.shape[0], p.numel() // p.shape[0]) if p.numel() else (p.shape[0], 0)
        if rank >= min(shape):
            self._warn_once(
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
        return _Subspace(shape, rank, group["proj"], gap, group["refresh"], offset)

    def _state_spec(self, p, group, rules) -> Dict[str, tuple]:
        """Key -> (shape, dtype) of the tensors a parameter's state holds (beside ``step``)."""
        dtype = _state_dtype(p, group)
        spec = {}
        sub = self._subspace(p, group, rules)
        if sub is not None:
            m, n = sub.shape
            spec["exp_avg"] = (sm.momentum_shape(m, n, sub.rank, sub.proj), dtype)
            dense = sub.proj in sm.DENSE_PROJECTIONS
            spec["proj"] = (sm.projector_shape(m, n, sub.rank, sub.proj), torch.float32 if dense else torch.int64)
        elif rules.beta1 > 0:
            spec["exp_avg"] = (tuple(p.shape), dtype)
        layout = self._layout(p, group, rules)
        if layout is not None:
            spec["exp_avg_sq"] = (layout.state_shape, dtype)
        return spec

    def _init_state(self, p, group, rules, index: int) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        sharded = distributed.is_dtensor(p)
        for key, (shape, dtype) in self._state_spec(p, group, rules).items():
            if sharded:  # shard by the parameter's rows what is laid out by its rows
                state[key] = distributed.state_tensor(p, shape, dtype, self._rows_sharded(p, group, rules, key))
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        if "proj" in state:
            state["proj_step"] = torch.tensor(0, dtype=torch.int64)
            if group["proj"] in _RANDOM_PROJECTIONS:
                state["seed"] = torch.tensor(sm.next_seed(group["seed"] * 1_000_003 + index), dtype=torch.int64)

    def _rows_sharded(self, p, group, rules, key: str) -> bool:
        """Whether state ``key`` of a row-sharded parameter is laid out by the parameter's rows."""
        if key == "proj":
            return False
        if key == "exp_avg_sq":
            return distributed.rows_local(self._layout(p, group, rules), p.numel() // max(1, p.shape[0]) if p.ndim else 1)
        sub = self._subspace(p, group, rules)
        if sub is None:  # full momentum
            return True
        dense = sub.proj in sm.DENSE_PROJECTIONS
        return dense == sub.is_tall  # m x r momentum: dense basis of a tall matrix, or columns of a wide one

    def _check_state(self, p, group, rules) -> None:
        state = self.state.get(p)
        if not state:
            return
        for key, (shape, _) in self._state_spec(p, group, rules).items():
            have = state.get(key)
            if have is None or tuple(have.shape) != tuple(shape):
                raise ValueError(
                    f"{type(self).__name__}: state {key!r} of a parameter of shape {tuple(p.shape)} is "
                    f"{None if have is None else tuple(have.shape)}, but the group's options need {tuple(shape)} "
                    "(were subset_size/rank/proj changed after the first step?)"
                )

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step. Validates everything before changing anything."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = []
        index = -1  # a parameter's place among all groups' parameters (its seed, its plan)
        for group in self.param_groups:
            group_key = _group_key(group)
            rules = self._validated(group, group_key)
            params = []
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                if p.grad.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex gradients")
                if p.grad.shape != p.shape:
                    raise ValueError(f"gradient shape {tuple(p.grad.shape)} does not match parameter {tuple(p.shape)}")
                params.append((p, index, *self._planned(p, group, rules, group_key, index)))
            plan.append((group, rules, params))
        sharded = []  # DTensor steps, run so that their all-reduces overlap with other work
        fast = []  # the fused path's parameters, of every group: one kernel call for them all
        for group, rules, params in plan:
            batch = []
            for p, index, path, options in params:
                state = self.state[p]
                if not state:
                    self._init_state(p, group, rules, index)
                if path == "fused":
                    fast.append((p, p.grad, state, options, group["lr"]))
                    continue
                if path == "local":  # a shard that needs no collective joins the one kernel call
                    fast.append((*distributed.local_views(p, p.grad, state), options, group["lr"]))
                    continue
                options = dict(options, lr=group["lr"])
                if path == "sharded":
                    sharded.append(distributed.sharded_step(p, p.grad, state, **options))
                elif path == "foreach":
                    batch.append((p, options))
                else:
                    sn_step_(p, p.grad, state, **options)
            if batch:
                self._update_foreach(batch, rules)
        run_fast = (lambda: fused.fused_steps_(fast, scratch=self._scratch)) if fast else None
        if sharded:  # the kernel call runs while the sharded steps' all-reduces are in flight
            distributed.run_overlapped(sharded, meanwhile=run_fast)
        elif run_fast is not None:
            run_fast()
        return loss

    def _validated(self, group: dict, group_key: tuple) -> Rules:
        """:meth:`_validate_group`, again only when the group's options (``_group_key``) change; the
        learning rate, which schedulers change at every step, is checked every time."""
        hit = self._rules.get(id(group))
        if hit is not None and hit[0] is group and hit[1] == group_key:
            _check_range("lr", group["lr"], 0.0)
            return hit[2]
        rules = self._validate_group(group)
        self._rules[id(group)] = (group, group_key, rules)
        return rules

    def _planned(self, p: torch.Tensor, group: dict, rules: Rules, group_key: tuple, index: int):
        """``(path, step options but lr)`` for ``p``, checked and computed again only when something
        that decides them changes (the group's options, the parameter's place, shape, dtype, device or
        layout, the gradient's dtype or layout, whether state exists); cleared by ``load_state_dict``."""
        compiling = torch.compiler.is_compiling()  # traced: never the fused kernel, never a cache entry
        key = (group_key, index, p.shape, p.dtype, p.device, p.is_contiguous(), p.grad.dtype, p.grad.is_contiguous(),
               bool(self.state.get(p)), compiling)
        hit = self._plans.get(p)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._check_state(p, group, rules)
        if distributed.is_dtensor(p):
            distributed.row_sharding(p)  # raises for layouts we do not handle
            path = "sharded"
        else:
            path = self._path(p, group, rules)
        options = self._step_options(p, group, rules, index)
        del options["lr"]  # read at every step (schedulers change it)
        if path != "sharded" and group["stochastic_rounding"] and _state_dtype(p, group) in _LOW_PRECISION:
            options["rounding_seed"] = group["seed"] * 1_000_003 + index
        if path == "sharded" and distributed.steps_locally(p, self.state.get(p) or {}, options):
            path = "local"
        if path in ("fused", "local"):
            options["kernel"] = fused.kernel_args(p, options)
        if not compiling:
            self._plans[p] = (key, (path, options))
        return path, options

    def _path(self, p: torch.Tensor, group: dict, rules: Rules) -> str:
        """``"fused"``, ``"foreach"`` or ``"reference"``."""
        if group["foreach"] is not True and self._use_fused(p, group):
            return "fused"
        # foreach=None: the multi-tensor path off CPU only, as torch.optim (on a CPU it is no faster than the loop)
        wanted = group["foreach"] or (group["foreach"] is None and p.device.type != "cpu")
        if (wanted and not torch.compiler.is_compiling() and not distributed.is_dtensor(p)
                and self._subspace(p, group, rules) is None and foreach.qualifies(p, _state_dtype(p, group))):
            return "foreach"
        return "reference"  # subspace momentum, low precision, compiled or foreach=fused=False

    def _use_fused(self, p: torch.Tensor, group: dict) -> bool:
        if group["fused"] is False or torch.compiler.is_compiling():  # compiled: inductor fuses the reference path
            return False
        ok = fused.supports(p, _state_dtype(p, group))
        if group["fused"] and not ok:
            raise RuntimeError(
                f"fused=True, but the fused kernel does not handle a {p.dtype} parameter on {p.device} "
                f"with {_state_dtype(p, group)} state (it needs float32, on CPU or on CUDA with Triton installed"
                + (f"; {kernel_error()}" if kernel_error() else "") + "); use fused=None to fall back"
            )
        return ok

    def _update_foreach(self, batch, rules: Rules) -> None:
        """One multi-tensor step for ``batch``: ``(param, step options)`` pairs of one group."""
        params = [p for p, _ in batch]
        options = batch[0][1]
        foreach.sn_step_foreach_(
            params, [p.grad for p in params], [self.state[p] for p in params],
            lr=options["lr"], beta1=rules.beta1, beta2=rules.beta2, eps=options["eps"],
            weight_decay=options["weight_decay"], bias_correction=rules.bias_correction,
            layouts=[o["layout"] for _, o in batch],
        )

    def _step_options(self, p: torch.Tensor, group: dict, rules: Rules, index: int) -> dict:
        """The keyword arguments of the functional step for one parameter."""
        return dict(
            lr=group["lr"],
            beta1=rules.beta1,
            beta2=rules.beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=rules.bias_correction,
            layout=self._layout(p, group, rules),
            subspace=self._subspace(p, group, rules, index),
            warn=self._warn_once,
        )

    # ---------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but state keeps its saved dtypes.

        torch casts floating state to the parameter's dtype, which would turn
        float32 state of a bf16 parameter into bf16 and int64 projector
        indices into floats; here only the device follows the parameter.
        Group options a checkpoint predates (e.g. ``foreach``) take their defaults.
        """
        super().load_state_dict(state_dict)
        self._plans.clear()
        self._rules.clear()
        for group in self.param_groups:  # options added since the checkpoint was written take their defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in saved:
                self.state[p] = {
                    k: (v.to(device=p.device) if torch.is_tensor(v) and k not in ("step", "proj_step", "seed") else v)
                    for k, v in saved[i].items()
                }


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


# -------------------------------------------------------------------- functional form
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
    """

    def __init__(self, compute: torch.dtype, generator: Optional[torch.Generator] = None):
        self.compute = compute
        self.generator = generator
        self._writeback = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == self.compute:
            return t
        w = t.to(self.compute)
        self._writeback.append((t, w))
        return w

    def write_back(self) -> None:
        for target, w in self._writeback:
            if self.generator is not None and target.dtype == torch.bfloat16:
                stochastic_round_(target, w, self.generator)
            else:
                target.copy_(w)


def refresh_due(state: dict, sub: _Subspace, step: int) -> bool:
    """Whether the projector is recomputed at ``step``: none yet, or the (staggered) gap has come round."""
    return (step + sub.offset) % sub.gap == 0 or int(state["proj_step"]) == 0


def _refresh_projector(
    state: dict, g: torch.Tensor, mom_tall: torch.Tensor, sub: _Subspace, step: int, warn, build=None, local=None
) -> bool:
    """Recompute the projector if due; apply the refresh policy to the momentum.

    ``build(gen)`` returns the new projector or ``None`` (default: from the full
    gradient ``g``); ``local`` is the tensor holding ``state["proj"]``'s values
    (its local view when state is a DTensor). Returns True when a new basis
    replaced an earlier one at this step.
    """
    if not refresh_due(state, sub, step):
        return False
    proj_step = int(state["proj_step"])
    gen = None
    if "seed" in state:
        seed = int(state["seed"])
        gen = torch.Generator(device=g.device).manual_seed(seed)
        state["seed"].fill_(sm.next_seed(seed))
    new = build(gen) if build is not None else sm.build_projector(sub.proj, g, sub.rank, gen)
    if new is None:
        warn(
            f"proj{sub.shape}",
            f"could not compute a {sub.proj!r} projector for a {sub.shape} gradient at step {step} "
            "(all zero, non-finite, or the factorization failed): "
            + ("keeping the previous basis" if proj_step else "using coordinate directions until the next step"),
        )
        if proj_step:
            return False
        new = sm.fallback_projector(sub.proj, sub.shape, sub.rank, g.device)
    else:
        state["proj_step"].fill_(step)
    old = state["proj"] if local is None else local
    if proj_step == 0 or sub.refresh == "reset":
        mom_tall.zero_()
    elif sub.refresh == "transport":
        mom_tall.copy_(sm.transport(mom_tall, old, new, max(sub.shape)))
    # "reference": the old momentum is read in the new basis this step, zeroed after it
    old.copy_(new)
    return proj_step != 0


#: projectors whose refresh traces into one graph under torch.compile (the random ones seed a host RNG)
_TRACEABLE_PROJECTIONS = ("svd", "topk")


def _fresh(*tensors):
    """Contiguous copies: ``torch.cond``'s branches must not alias their inputs and must agree on strides."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)


def _refresh_projector_traced(state: dict, g: torch.Tensor, mom_tall: torch.Tensor, sub: _Subspace, step):
    """:func:`_refresh_projector` for ``torch.compile``: the same policy as tensor ops under ``torch.cond``.

    No host reads: whether a refresh is due, whether the gradient is usable
    (finite, not all zero) and what happens to the momentum are tensors.
    Returns a bool tensor: a new basis replaced an earlier one.
    """
    proj, proj_step = state["proj"], state["proj_step"]
    due = (proj_step == 0) | ((step + sub.offset) % sub.gap == 0)
    fallback = sm.fallback_projector(sub.proj, sub.shape, sub.rank, g.device)

    def refresh(g, mom, old, proj_step, step):
        a = g.float()
        usable = torch.isfinite(a).all() & (a.abs().amax() > 0)
        new = sm.raw_projector(sub.proj, torch.where(usable, a, torch.zeros_like(a)), sub.rank)
        first = proj_step == 0
        new = torch.where(usable, new, torch.where(first, fallback, old))
        if sub.refresh == "transport":
            carried = sm.transport(mom, old, new, max(sub.shape))
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


def sn_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: Optional[float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    layout: Optional[SubsetLayout],
    subspace: Optional[_Subspace],
    warn: Callable[[str, str], None],
    rounding_seed: Optional[int] = None,
) -> None:
    r"""One step for one parameter (the for-loop reference path).

    ``rounding_seed``: write low-precision state back with stochastic rounding,
    from a random stream fixed by this seed and the step (so a resumed run
    draws the same bits).

    .. math::

        N_t = \begin{cases}
            G_t & \beta_1 = 0 \\
            m_t = \beta_1 m_{t-1} + (1-\beta_1) G_t & \text{full momentum} \\
            \text{back}(M_t) + G_t - \text{back}(R_t) & \text{subspace momentum}
        \end{cases}

        W \leftarrow W - \eta\, c_t\, N_t / (\sqrt{v_t} + \epsilon);\quad
        W \leftarrow (1 - \eta\lambda) W
    """
    compute = _compute_dtype(param)
    state["step"] += 1
    step = step_count(state["step"])
    g = grad.to(compute)
    working = Workspace(compute, None if rounding_seed is None else rounding_generator(rounding_seed, state["step"], g.device))

    if subspace is not None:
        is_tall = subspace.is_tall
        gm = g.reshape(subspace.shape)
        a = sm.tall(gm, is_tall)
        mom = sm.tall(working(state["exp_avg"]), is_tall)
        if isinstance(step, torch.Tensor) and subspace.proj in _TRACEABLE_PROJECTIONS:
            refreshed = _refresh_projector_traced(state, gm, mom, subspace, step)
        else:
            refreshed = _refresh_projector(state, gm, mom, subspace, step, warn)
        p = state["proj"]
        r = sm.project(a, p)
        mom.mul_(beta1).add_(r, alpha=1.0 - beta1)
        num = sm.tall(sm.numerator(a, mom, r, p), is_tall).reshape(param.shape)
        if subspace.refresh == "reference":
            if isinstance(refreshed, torch.Tensor):
                mom.masked_fill_(refreshed, 0.0)
            elif refreshed:
                mom.zero_()
    elif beta1 > 0:
        num = working(state["exp_avg"]).mul_(beta1).add_(g, alpha=1.0 - beta1)
    else:
        num = g

    if beta2 is not None:
        v = working(state["exp_avg_sq"])
        accumulate_(v, g, layout, beta2)
        update = divide_by_root(num, v, layout, eps)
    else:
        update = num

    apply_update_(param, update, lr, step_scale(lr, beta1, beta2, step, bias_correction), weight_decay)
    working.write_back()


def apply_update_(param: torch.Tensor, update: torch.Tensor, lr, scale, weight_decay: float) -> None:
    """``param -= scale * update``, then decoupled weight decay."""
    if isinstance(scale, torch.Tensor):  # a tensor lr (as torch.optim allows) stays on device
        param.sub_((update * scale).to(param.dtype))
    else:
        param.add_(update.to(param.dtype), alpha=-scale)
    decoupled_weight_decay_(param, lr, weight_decay)
