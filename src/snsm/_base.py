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
* ``load_state_dict`` keeps the saved dtypes of state (torch casts floating
  state to the parameter's dtype, which would turn the float32 state of a
  bf16 parameter into bf16 and int64 projector indices into floats), moves
  tensors to the parameter's device but for the CPU counters
  :attr:`StrictOptimizer.CPU_STATE`, and gives options a checkpoint predates
  their defaults;
* one-time warnings point at the user's line.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch.optim import Optimizer

from ._common import STATE_DTYPES, caller_stacklevel

__all__ = ["StrictOptimizer", "GROUP_KEYS_FROM_ELSEWHERE", "PORTED_OPTIONS"]

#: param-group keys that torch or its LR schedulers put in groups (a group copied from another
#: optimizer carries them), known to every optimizer
GROUP_KEYS_FROM_ELSEWHERE = frozenset({
    "params", "param_names", "name", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum",
})

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
        self._warned: set = set()
        super().__init__(params, defaults)

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
        """Validate everything one step needs and return its plan; change nothing."""
        raise NotImplementedError

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
            self.validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

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

    # ---------------------------------------------------------------- warnings
    def warn_once(self, key: str, message: str) -> None:
        """``warnings.warn(message)`` the first time ``key`` is seen by this optimizer."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())

    # ---------------------------------------------------------------- checks
    def check_grad(self, p: torch.Tensor) -> None:
        """Raise unless ``p.grad`` is a dense, real gradient of ``p``'s shape."""
        name = type(self).__name__
        if p.grad.is_sparse:
            raise ValueError(f"{name} does not support sparse gradients")
        if p.grad.is_complex():
            raise TypeError(f"{name} does not support complex gradients")
        if p.grad.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(p.grad.shape)} does not match parameter {tuple(p.shape)}")

    def check_state(self, p: torch.Tensor, group: dict, hint: str = "") -> None:
        """Raise if ``p``'s existing state does not have the shapes :meth:`state_spec` asks for."""
        state = self.state.get(p)
        if not state:
            return
        for key, (shape, _) in self.state_spec(p, group).items():
            have = state.get(key)
            if have is None or tuple(have.shape) != tuple(shape):
                raise ValueError(
                    f"{type(self).__name__}: state {key!r} of a parameter of shape {tuple(p.shape)} is "
                    f"{None if have is None else tuple(have.shape)}, but the group's options need {tuple(shape)}"
                    + (f" ({hint})" if hint else "")
                )

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step. Validates everything before changing anything."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_step(self.prepare_step())
        return loss

    # ---------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but state keeps its saved dtypes (see the
        module doc); group options added since the checkpoint was written take their defaults."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in saved:
                self.state[p] = {
                    k: (v.to(device=p.device) if torch.is_tensor(v) and k not in self.CPU_STATE else v)
                    for k, v in saved[i].items()
                }
