"""A strict ``torch.optim.Optimizer`` base: every check before any write.

What the library's optimizers share beyond torch's base class:

* ``add_param_group`` validates the new group (floating, real parameters;
  the subclass's :meth:`StrictOptimizer.validate_group`) and removes it again
  when that fails, so a refused group leaves the optimizer as it was;
* option keys the optimizer does not know (a typo, a GaLore option such as
  ``update_proj_gap``) warn once, naming the closest known option;
* :meth:`StrictOptimizer.step` prepares the whole step (validates every group,
  gradient and piece of state) before :meth:`StrictOptimizer.apply_step`
  writes anything, so a step that raises changes nothing;
* ``load_state_dict`` casts floating state to the dtype this optimizer
  gives it (:meth:`StrictOptimizer.state_spec`: the group's ``state_dtype``,
  else float32 for bf16/fp16 parameters and the parameter's own dtype
  otherwise), where torch casts to the parameter's dtype, which would turn
  the float32 state of a bf16 parameter into bf16 and int64 projector
  indices into floats; a float64 checkpoint loaded into float32 parameters
  therefore steps in float32, as torch's would. Tensors move to the
  parameter's device but for the CPU counters
  :attr:`StrictOptimizer.CPU_STATE`, which become tensors where a checkpoint
  kept them as Python numbers; options a checkpoint predates take their
  defaults; a checkpoint of another optimizer whose state would be read
  under other rules (AdamW-SN's EMA as AdaGrad-SN's running sum) is refused
  (:meth:`StrictOptimizer.rules_record`);
* ``maximize=True`` ascends (torch's convention: the gradient is negated);
  ``capturable=True`` and ``differentiable=True`` are refused;
* ``copy.deepcopy`` and pickling give a working optimizer;
* :meth:`StrictOptimizer.step_in_backward` steps each parameter inside
  backward and frees its gradient (:mod:`snsm.in_backward`), with
  :meth:`StrictOptimizer.accumulating` for gradient accumulation; a
  training loop keeps its shape, ``step()`` then does only what is left;
* one-time warnings point at the user's line.
"""
from __future__ import annotations

import contextlib
import difflib
import warnings
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch.optim import Optimizer

from ._common import STATE_DTYPES, caller_stacklevel
from .in_backward import InBackward

__all__ = ["StrictOptimizer", "GROUP_KEYS_FROM_ELSEWHERE", "PORTED_OPTIONS"]

#: param-group keys that torch or its LR schedulers put in groups (a group copied from another
#: optimizer carries them), known to every optimizer
GROUP_KEYS_FROM_ELSEWHERE = frozenset({
    "params", "param_names", "name", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum",
    "capturable", "differentiable",
})

#: torch.optim options no path here implements: accepted only as False
UNSUPPORTED_FLAGS = {
    "capturable": "the steps read their step counters on the host (they are not CUDA-graph capturable)",
    "differentiable": "the steps run under torch.no_grad (use torch.func for gradients through an update)",
}

#: the saved param-group key that records the rules a checkpoint's state was written under
RULES_KEY = "snsm_rules"

#: options of other optimizers people port to this library, and ours that do the same job
PORTED_OPTIONS = {
    "update_proj_gap": "proj_gap",  # GaLore
    "proj_type": "proj",  # GaLore
    "scale": None,  # GaLore's update scale: fold it into lr
}


class StrictOptimizer(Optimizer):
    """The shared shell of the library's optimizers (see the module doc).

    Subclasses implement :meth:`validate_group`, :meth:`prepare_step` and
    :meth:`apply_step`, and may describe their state with :meth:`state_spec`
    (checked by :meth:`check_state`).
    """

    #: state keys that stay on CPU whatever the parameter's device (counters and seeds)
    CPU_STATE = ("step",)

    def __init__(self, params, defaults: Dict[str, Any]):
        defaults = dict(defaults)
        defaults.setdefault("maximize", False)
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        """Per-process caches (not part of the optimizer's state): rebuilt after unpickling."""
        self._warned: set = set()
        self._owners: Optional[dict] = None  # param -> (group, index among all groups' parameters)
        self._in_backward: Optional[InBackward] = None
        self._stepped: set = set()  # stepped in backward since the last step() (their .grad may remain: DDP)
        self.accumulating_now = False

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.defaults.pop("differentiable", None)  # torch adds it; no option of ours (refused when True)
        self._init_caches()

    # ---------------------------------------------------------------- hooks
    def validate_group(self, group: dict) -> Any:  # pragma: no cover - abstract
        """Raise ``ValueError``/``TypeError`` naming the option unless ``group``'s options are valid."""
        raise NotImplementedError

    def normalize_group(self, group: dict) -> None:
        """Turn accepted spellings of options into their stored form, in place (before validation)."""
        dtype = group.get("state_dtype")
        if isinstance(dtype, torch.dtype):
            names = {v: k for k, v in STATE_DTYPES.items()}
            if dtype not in names:
                raise ValueError(f"Invalid state_dtype: {dtype} (allowed: None, {', '.join(STATE_DTYPES)})")
            group["state_dtype"] = names[dtype]

    def check_param(self, p: torch.Tensor, group: dict) -> None:
        """Raise unless ``p`` can be optimized in ``group``: a real floating-point tensor."""
        name = type(self).__name__
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters (got {p.dtype})")
        if not p.is_floating_point():
            raise TypeError(f"{name} needs floating-point parameters (got {p.dtype})")

    def state_spec(self, p: torch.Tensor, group: dict) -> Dict[str, tuple]:
        """Key -> ``(shape, dtype)`` of the tensors ``p``'s state holds beside ``step``."""
        return {}

    def prepare_step(self) -> Any:  # pragma: no cover - abstract
        """Validate everything one step needs and return its plan; change nothing. Parameters
        :meth:`pending` says are done are left out."""
        raise NotImplementedError

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Step one parameter with ``grad`` now (validated first): what a step in backward runs."""
        raise NotImplementedError

    def pending(self, p: torch.Tensor) -> bool:
        """Whether an ordinary :meth:`step` steps ``p``: it has a gradient it did not step on in backward."""
        return p.grad is not None and p not in self._stepped

    def apply_step(self, plan: Any) -> None:  # pragma: no cover - abstract
        """Carry out a plan of :meth:`prepare_step`."""
        raise NotImplementedError

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        self._warn_unknown_keys(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.normalize_group(group)
            for p in group["params"]:
                self.check_param(p, group)
            self.check_torch_flags(group)
            self.validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._owners = None
        if getattr(self, "_in_backward", None) is not None:
            self._in_backward.hook_new_parameters()

    def parameters(self) -> Iterator[torch.Tensor]:
        """Every parameter of every group, in order."""
        for group in self.param_groups:
            yield from group["params"]

    def owner(self, p: torch.Tensor) -> Optional[tuple]:
        """``(group, index)`` of parameter ``p`` (its place among all groups' parameters), or ``None``."""
        if self._owners is None:
            owners = {}
            index = 0
            for group in self.param_groups:
                for q in group["params"]:
                    owners[q] = (group, index)
                    index += 1
            self._owners = owners
        return self._owners.get(p)

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner(p) is not None

    def _warn_unknown_keys(self, param_group: dict) -> None:
        if not isinstance(param_group, dict) or not getattr(self, "defaults", None):
            return
        known = set(self.defaults) | GROUP_KEYS_FROM_ELSEWHERE
        for key in param_group:
            if key in known or not isinstance(key, str):
                continue
            suggestion = PORTED_OPTIONS.get(key, "")
            if suggestion == "":
                close = difflib.get_close_matches(key, sorted(self.defaults), n=1, cutoff=0.6)
                suggestion = close[0] if close else None
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            if key in PORTED_OPTIONS and suggestion is None:
                hint = " (another optimizer's option; it has no counterpart here)"
            self.warn_once(
                f"unknown-key:{key}",
                f"{type(self).__name__} does not know the param-group option {key!r}: it is ignored{hint}",
            )

    def check_torch_flags(self, group: dict) -> None:
        """``maximize`` must be a bool; ``capturable`` and ``differentiable`` may only be False."""
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"Invalid maximize: {group['maximize']!r} (expected True or False)")
        for flag, why in UNSUPPORTED_FLAGS.items():
            if group.get(flag, False) is not False:
                raise ValueError(f"Invalid {flag}: {group[flag]!r}: {type(self).__name__} does not support "
                                 f"{flag}=True ({why}); allowed: False")

    def rules_record(self, group: dict) -> Any:
        """What a checkpoint records of the rules ``group``'s state is written under (plain Python
        values); ``None``: nothing to check. A load whose saved record differs is refused."""
        return None

    # ---------------------------------------------------------------- warnings
    def warn_once(self, key: str, message: str) -> None:
        """``warnings.warn(message)`` the first time ``key`` is seen by this optimizer."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())

    # ---------------------------------------------------------------- checks
    def check_grad(self, p: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
        """Raise unless ``grad`` (default ``p.grad``) is a dense, real gradient of ``p``'s shape."""
        grad = p.grad if grad is None else grad
        name = type(self).__name__
        if grad.is_sparse:
            raise ValueError(f"{name} does not support sparse gradients")
        if grad.is_complex():
            raise TypeError(f"{name} does not support complex gradients")
        if grad.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")

    def counters(self, p: torch.Tensor, group: dict) -> tuple:
        """The scalar CPU tensors ``p``'s state holds beside :meth:`state_spec`'s (``step``, ...)."""
        return ("step",)

    def check_state(self, p: torch.Tensor, group: dict, hint: str = "") -> None:
        """Raise if ``p``'s existing state lacks a counter or a tensor of the shape and dtype
        :meth:`state_spec` asks for (so a step never starts on state it would stop half-way through)."""
        state = self.state.get(p)
        if not state:
            return
        name = type(self).__name__
        for key in self.counters(p, group):
            if not torch.is_tensor(state.get(key)) or state[key].numel() != 1:
                raise ValueError(f"{name}: the state of a parameter of shape {tuple(p.shape)} has no {key!r} "
                                 f"counter (got {state.get(key)!r}); was it loaded from another optimizer?")
        for key, (shape, dtype) in self.state_spec(p, group).items():
            have = state.get(key)
            if have is None or tuple(have.shape) != tuple(shape):
                raise ValueError(
                    f"{name}: state {key!r} of a parameter of shape {tuple(p.shape)} is "
                    f"{None if have is None else tuple(have.shape)}, but the group's options need {tuple(shape)}"
                    + (f" ({hint})" if hint else "")
                )
            if have.dtype != dtype:
                raise ValueError(f"{name}: state {key!r} of a parameter of shape {tuple(p.shape)} is {have.dtype}, "
                                 f"but the group's options need {dtype}")

    @staticmethod
    def gradient(p: torch.Tensor, group: dict, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient a step descends along: ``grad`` (default ``p.grad``), negated under ``maximize=True``."""
        grad = p.grad if grad is None else grad
        return -grad if group["maximize"] else grad

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step. Validates everything before changing anything.

        While :meth:`step_in_backward` is on, only what is left steps (parameters whose gradient
        appeared outside its hooks); those that stepped in backward are skipped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_step(self.prepare_step())
        self._stepped.clear()
        if self._in_backward is not None:
            self._in_backward.end_step()
        return loss

    # ---------------------------------------------------------------- in backward
    def step_in_backward(self, model: Optional[torch.nn.Module] = None, *, clip: Optional[str] = None,
                         max_norm: float = 1.0) -> InBackward:
        """Step each parameter inside backward, as soon as its gradient is final, and free it.

        Returns a handle with ``.remove()``. ``model``: the ``DistributedDataParallel`` module
        (required under DDP: parameters step after their bucket's all-reduce) or an FSDP2 module
        (optional: :meth:`accumulating` then skips its reduce-scatter). ``clip``: ``None``,
        ``"tensor"`` or ``"previous"`` with ``max_norm`` (see :mod:`snsm.in_backward`). The
        trajectory equals ordinary steps (bit for bit on every path, with the same clipping),
        and state keeps its layout, so checkpoints move between the two modes.
        """
        if self._in_backward is not None:
            raise RuntimeError(f"{type(self).__name__} already steps in backward: remove() its handle first")
        handle = InBackward(self, model, clip, max_norm)
        self._in_backward = handle
        return handle

    def forget_in_backward(self, handle: InBackward) -> None:
        """Called by a handle's ``remove()``: ordinary steps from now on."""
        if self._in_backward is handle:
            self._in_backward = None
            self._stepped.clear()

    @contextlib.contextmanager
    def accumulating(self):
        """Gradient accumulation while stepping in backward: inside, backward only accumulates
        (``with opt.accumulating(): loss.backward()`` for every micro-batch but the last; the
        model's ``no_sync`` too, where :meth:`step_in_backward` was given it)."""
        previous = self.accumulating_now
        self.accumulating_now = True
        try:
            with (self._in_backward.no_sync() if self._in_backward is not None else contextlib.nullcontext()):
                yield
        finally:
            self.accumulating_now = previous

    def stepped_in_backward(self, p: torch.Tensor) -> None:
        """Record that ``p`` took its step in backward (an ordinary :meth:`step` skips it until the next one)."""
        self._stepped.add(p)

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """As torch's, with each group's :meth:`rules_record` under ``"snsm_rules"`` (where there is one)."""
        sd = super().state_dict()
        for saved, group in zip(sd["param_groups"], self.param_groups):
            record = self.rules_record(group)
            if record is not None:
                saved[RULES_KEY] = record
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, with the dtype, counter and rules handling of
        the module doc. Raises ``ValueError`` before changing anything for a checkpoint written under
        other rules."""
        self._check_rules_records(state_dict)
        state_dict = dict(state_dict, param_groups=[{k: v for k, v in g.items() if k != RULES_KEY}
                                                    for g in state_dict["param_groups"]])
        super().load_state_dict(state_dict)
        self._owners = None
        self.defaults.pop("differentiable", None)  # torch's __setstate__ adds it; no option of ours
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        owners = [(p, g) for g in self.param_groups for p in g["params"]]
        for i, (p, group) in zip(saved_ids, owners):
            if i in saved:
                try:
                    spec = self.state_spec(p, group)
                except (TypeError, ValueError):
                    spec = {}
                self.state[p] = {k: self._loaded(k, v, p, spec.get(k)) for k, v in saved[i].items()}

    def _loaded(self, key: str, value, p: torch.Tensor, spec) -> Any:
        """One loaded state entry: counters as CPU tensors, floating state in its spec's dtype, on ``p``'s device."""
        if key in self.CPU_STATE:  # a copy: two optimizers loaded from one dict must not share a counter
            if torch.is_tensor(value):
                return value.detach().clone()
            return torch.tensor(float(value) if key == "step" else int(value),
                                dtype=torch.float32 if key == "step" else torch.int64)
        if not torch.is_tensor(value):
            return value
        dtype = spec[1] if spec is not None and value.is_floating_point() and spec[1].is_floating_point else None
        return value.to(device=p.device, dtype=dtype)

    def _check_rules_records(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            return  # torch's load_state_dict says what is wrong
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if RULES_KEY not in saved:
                continue
            options = dict(self.defaults)
            options.update({k: v for k, v in saved.items() if k not in ("params", RULES_KEY)})
            options["params"] = group["params"]
            try:
                ours = self.rules_record(options)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{type(self).__name__} cannot read the checkpoint's param group {index}: {exc}") from None
            theirs = saved[RULES_KEY]
            if ours is not None and _plain(ours) != _plain(theirs):
                raise ValueError(
                    f"{type(self).__name__} cannot load this checkpoint: its param group {index} was written under "
                    f"{theirs}, and {type(self).__name__} would read that state as {ours} (a checkpoint of another "
                    "optimizer class or variant?)"
                )


def _plain(record):
    """A record as nested lists (a checkpoint may turn tuples into lists)."""
    if isinstance(record, (list, tuple)):
        return [_plain(r) for r in record]
    return record
