"""snsm optimizers in ``transformers.Trainer``.

Two ways in, both grouping by module type with :func:`snsm.param_groups`
(embeddings, norms and biases coordinate-wise; linear weights Subset-Norm /
Subspace-Momentum; LoRA factors Subset-Norm without subspace momentum):

* :func:`optimizer_cls_and_kwargs` returns the pair for
  ``Trainer(optimizer_cls_and_kwargs=...)``. Its first element is a factory
  (not an ``Optimizer`` subclass): Trainer calls ``factory()(model, **kwargs)``
  with the model it trains (``transformers.trainer_optimizer.is_optimizer_factory``;
  transformers 5), so the optimizer sees modules, not Trainer's own
  decay / no-decay lists.
* :class:`SNSMTrainerMixin` (``class MyTrainer(SNSMTrainerMixin, Trainer)``)
  overrides ``create_optimizer``: it works with transformers versions without
  optimizer factories and is the way to step inside backward
  (``in_backward=True``): the hooks go on the model Trainer wraps (the DDP
  module under DDP), and the micro-batches of gradient accumulation that do
  not step run inside ``opt.accumulating()``.

The pitfall this avoids: ``optimizer_cls_and_kwargs=(snsm.AdamWSNSM, {...})``
hands the optimizer Trainer's two groups (decay / no decay), so the
embedding (and a tied head) gets Subset-Norm and subspace momentum too, and
nothing warns.

``transformers`` is imported only inside the functions that need it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from snsm.in_backward import CLIP_MODES
from snsm.integrations import OPTIMIZERS, build_optimizer, check_options

__all__ = ["optimizer_cls_and_kwargs", "SNSMOptimizerFactory", "SNSMTrainerMixin", "IN_BACKWARD_OPTIONS",
           "OPTIMIZERS"]

log = logging.getLogger(__name__)

#: options of :class:`SNSMTrainerMixin` (not of the factory): steps inside backward
IN_BACKWARD_OPTIONS = ("in_backward", "clip", "max_norm")


def _require_factories() -> None:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} has no optimizer factories (Trainer would pass its own "
            "decay / no-decay groups): use snsm.integrations.transformers.SNSMTrainerMixin") from None
    if not is_optimizer_factory(SNSMOptimizerFactory):  # pragma: no cover - protocol changed
        raise RuntimeError("transformers does not treat SNSMOptimizerFactory as a factory: use SNSMTrainerMixin")


def _refuse_in_backward(options: Mapping[str, Any]) -> None:
    given = [k for k in IN_BACKWARD_OPTIONS if k in options]
    if given:
        raise ValueError(f"{given[0]!r}: steps inside backward need the model Trainer wraps and its "
                         "gradient-accumulation flag: use SNSMTrainerMixin(snsm_options={'in_backward': True, ...})")


def optimizer_cls_and_kwargs(name: str, **options: Any) -> Tuple[type, Dict[str, Any]]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``name``: one of :data:`snsm.integrations.OPTIMIZERS` (``"adamw-snsm"``, ``"adamw-sn"``,
    ``"rmsprop-sn"``, ``"adagrad-snsm"``, ``"sgd-sm"``, ...); ``options``: the optimizer's
    (``lr``, ``rank``, ``proj_gap``, ``weight_decay``, ``betas``, ...) and the grouping's
    (``embeddings``, ``lora_subset_size``, ``aux_lr``); see :mod:`snsm.integrations`.
    ``TrainingArguments.learning_rate`` and ``weight_decay`` are not read: pass ``lr`` (else
    the class's default) and ``weight_decay`` (default 0). The scheduler Trainer builds from
    its arguments drives the groups' ``lr``.

    Unknown names and options, and values the optimizer refuses, raise ``ValueError`` here.
    Needs a transformers with optimizer factories (5.x); otherwise ``RuntimeError``: use
    :class:`SNSMTrainerMixin`.
    """
    _refuse_in_backward(options)
    check_options(name, options)
    _require_factories()
    return SNSMOptimizerFactory, {"name": name, **options}


class SNSMOptimizerFactory:
    """What :func:`optimizer_cls_and_kwargs` hands Trainer: ``SNSMOptimizerFactory()(model, name=..., **options)``
    builds the optimizer for the model Trainer trains (:func:`snsm.integrations.build_optimizer`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise RuntimeError("this Trainer called SNSMOptimizerFactory like an optimizer class (it has no "
                               "optimizer factories): use snsm.integrations.transformers.SNSMTrainerMixin")

    def __call__(self, model: torch.nn.Module, name: str, **options: Any) -> torch.optim.Optimizer:
        opt = build_optimizer(model, name, **options)
        log.info("snsm: %s for %s (%d groups)", name, type(model).__name__, len(opt.param_groups))
        return opt


def _unwrap_optimizer(opt):
    """The snsm optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while not hasattr(opt, "step_in_backward") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _hook_target(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module to give ``step_in_backward``: the DDP wrapper, or an FSDP2 module; else ``None``."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        return model
    return None


class SNSMTrainerMixin:
    """``class MyTrainer(SNSMTrainerMixin, transformers.Trainer)``: an snsm optimizer by name.

    ``MyTrainer(model=..., args=..., snsm_optimizer="adamw-snsm", snsm_options={"lr": 1e-2, "rank": 64})``,
    or set the class attributes :attr:`snsm_optimizer` / :attr:`snsm_options` in a subclass.
    Options as for :func:`optimizer_cls_and_kwargs`, except that ``lr`` and ``weight_decay``
    default to ``TrainingArguments.learning_rate`` / ``weight_decay`` when not given, plus:

    * ``in_backward=True``: each parameter steps inside backward as soon as its gradient is
      final, and the gradient is freed (``opt.step_in_backward``; under DDP a communication
      hook steps each bucket after its all-reduce). The handle is registered on the model
      Trainer trains (its DDP module) at the first training step; with
      ``gradient_accumulation_steps > 1`` the micro-batches that do not step (Trainer's
      ``accelerator.sync_gradients`` is False) run inside ``opt.accumulating()``. The
      trajectory equals ordinary steps. Trainer's global clipping cannot run inside backward:
      ``TrainingArguments(max_grad_norm=0)`` is required; clip with ``clip="tensor"`` (each
      gradient to norm ``max_norm``) or ``clip="previous"`` (the previous step's global factor).
      Trainer's logged ``grad_norm`` is then 0 (the gradients are gone by then).

    Overrides ``create_optimizer`` (so it works with transformers versions without optimizer
    factories) and ``training_step``.
    """

    #: the optimizer's name (a key of :data:`snsm.integrations.OPTIMIZERS`)
    snsm_optimizer: str = "adamw-snsm"
    #: its options (see the class doc)
    snsm_options: Mapping[str, Any] = {}

    def __init__(self, *args: Any, snsm_optimizer: Optional[str] = None,
                 snsm_options: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("SNSMTrainerMixin builds the optimizer itself: pass snsm_optimizer / snsm_options, "
                             "not optimizer_cls_and_kwargs")
        name = self.snsm_optimizer if snsm_optimizer is None else snsm_optimizer
        options = dict(self.snsm_options if snsm_options is None else snsm_options)
        self.snsm_in_backward = self._in_backward_options(options)
        check_options(name, options)
        self.snsm_optimizer, self.snsm_options = name, options
        self._snsm_handle = None
        self._snsm_hooked = None  # (optimizer, model) the handle was registered for
        super().__init__(*args, **kwargs)
        if self.snsm_in_backward is not None:
            self._check_clipping()

    @staticmethod
    def _in_backward_options(options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Take the in-backward options out of ``options``; ``None`` when off."""
        on = options.pop("in_backward", False)
        clip = options.pop("clip", None)
        max_norm = options.pop("max_norm", 1.0)
        if not isinstance(on, bool):
            raise ValueError(f"Invalid in_backward: {on!r} (expected True or False)")
        if clip not in CLIP_MODES:
            raise ValueError(f"Invalid clip: {clip!r} (allowed: None, 'tensor', 'previous')")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < float("inf"):
            raise ValueError(f"Invalid max_norm: {max_norm!r} (allowed range (0, inf))")
        if not on:
            if clip is not None:
                raise ValueError("clip needs in_backward=True (without it, Trainer's max_grad_norm clips)")
            return None
        return {"clip": clip, "max_norm": float(max_norm)}

    def _check_clipping(self) -> None:
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise ValueError(
                f"in_backward=True steps before Trainer's global clipping could run: set "
                f"TrainingArguments(max_grad_norm=0) (it is {self.args.max_grad_norm}) and clip with "
                "snsm_options clip='tensor' or clip='previous' (max_norm=...) if wanted")

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """Build :attr:`snsm_optimizer` for the model Trainer trains (grouped by module type)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            options = dict(self.snsm_options)
            options.setdefault("lr", self.args.learning_rate)
            options.setdefault("weight_decay", self.args.weight_decay)
            self.optimizer = build_optimizer(opt_model, self.snsm_optimizer, **options)
            log.info("snsm: %s for %s (%d groups)", self.snsm_optimizer, type(opt_model).__name__,
                     len(self.optimizer.param_groups))
        return self.optimizer

    # ------------------------------------------------------------------ steps in backward
    def _snsm_register(self, model: torch.nn.Module):
        """Register (once per optimizer and model) the in-backward handle; return the snsm optimizer."""
        opt = _unwrap_optimizer(self.optimizer)
        if not hasattr(opt, "step_in_backward"):
            raise TypeError(f"in_backward=True needs an snsm optimizer, Trainer holds {type(opt).__name__}")
        target = _hook_target(model)
        if self._snsm_hooked is not None and self._snsm_hooked[0] is opt and self._snsm_hooked[1] is target:
            return opt
        if self._snsm_handle is not None:
            if target is not None and self._snsm_hooked[1] is target:
                # DDP keeps one communication hook per model: it cannot be registered twice
                raise RuntimeError("in_backward: a new optimizer on a DDP model that already has the hook")
            self._snsm_handle.remove()
        self._check_clipping()
        self._snsm_handle = opt.step_in_backward(target, **self.snsm_in_backward)
        self._snsm_hooked = (opt, target)
        log.info("snsm: stepping inside backward (%s)", "DDP buckets" if target is not None and
                 isinstance(target, torch.nn.parallel.DistributedDataParallel) else "parameter hooks")
        return opt

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        if self.snsm_in_backward is None:
            return super().training_step(model, inputs, *args, **kwargs)
        opt = self._snsm_register(model)
        if getattr(self.accelerator, "sync_gradients", True):
            return super().training_step(model, inputs, *args, **kwargs)
        with opt.accumulating():  # a micro-batch that does not step: backward only accumulates
            return super().training_step(model, inputs, *args, **kwargs)


def __getattr__(name: str):
    """``SNSMTrainer``: ``SNSMTrainerMixin`` on ``transformers.Trainer`` (built on first access)."""
    if name == "SNSMTrainer":
        from transformers import Trainer

        cls = type("SNSMTrainer", (SNSMTrainerMixin, Trainer), {
            "__module__": __name__,
            "__doc__": "``transformers.Trainer`` with an snsm optimizer by name (see :class:`SNSMTrainerMixin`).",
        })
        globals()["SNSMTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
