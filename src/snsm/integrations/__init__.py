"""Building snsm optimizers by name for training frameworks.

:data:`OPTIMIZERS` maps the benchmark's names of the library's optimizers
(``"adamw-snsm"``, ``"adamw-sn"``, ``"rmsprop-sn"``, ...) to a
:class:`Recipe`: the class and the options the name sets. :func:`build_optimizer`
builds one for a model, grouped by module type with :func:`snsm.param_groups`
(linear weights Subset-Norm / Subspace-Momentum, LoRA factors Subset-Norm,
embeddings, norms and biases coordinate-wise). Framework glue lives in the
submodules (:mod:`snsm.integrations.transformers`), which import their
framework only when used.

Options (keyword arguments of :func:`build_optimizer`):

* the optimizer's own constructor options (``lr``, ``betas``, ``eps``,
  ``weight_decay``, ``momentum``, ``state_dtype``, ``fused``, ...);
* the per-matrix options of the linear weights' group: ``subset_size`` and,
  for the Subspace-Momentum names, ``rank``, ``proj``, ``proj_gap``,
  ``refresh``, ``stagger``, ``seed``;
* ``embeddings`` (embeddings under SN/SM too, see :func:`snsm.param_groups`),
  ``lora_subset_size`` (the LoRA factors' ``subset_size``), ``aux_lr`` (the
  learning rate of the coordinate-wise groups: embeddings, norms, biases, and
  LoRA factors with ``lora_subset_size=None``; default: ``lr``).

``weight_decay`` applies to the matrices (linear weights, LoRA factors,
embeddings) and not to vectors (biases, norm scales), as
``transformers.Trainer`` does. Every name defaults to ``weight_decay=0``.

``"loft"`` / ``"loft-sn"`` (:class:`snsm.LoFTAdamW`) are built on the model
itself, a peft model with LoRA adapters: LoFT on each LoRA pair, AdamW on the
other trainable parameters; they take LoFTAdamW's options (``lr``, ``betas``,
``damping``, ``max_grad_norm``, ...) and no grouping options.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

import snsm
from snsm.grouping import SUBSPACE_OPTIONS

__all__ = ["Recipe", "OPTIMIZERS", "GROUPING_OPTIONS", "build_optimizer", "check_options", "allowed_options"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer name: the snsm class and the options the name sets over the class's defaults."""

    cls: type
    options: Mapping[str, Any]
    description: str
    #: the class is built on the model itself (``cls(model, **options)``: LoFT finds the peft LoRA pairs
    #: by name), not on :func:`snsm.param_groups`' groups; the grouping options do not apply
    takes_model: bool = False

    @property
    def subspace(self) -> bool:
        """Whether the class keeps Subspace-Momentum (takes ``rank``)."""
        return "rank" in _constructor_options(self.cls)


_NO_DECAY = types.MappingProxyType({"weight_decay": 0.0})


def _recipe(cls, description, takes_model=False, **options) -> Recipe:
    return Recipe(cls, types.MappingProxyType({**_NO_DECAY, **options}), description, takes_model)


#: the library's optimizers by the benchmark's names (``snsm.bench.optimizers``)
OPTIMIZERS: Mapping[str, Recipe] = types.MappingProxyType({
    "adamw-sn": _recipe(snsm.AdamWSN, "AdamW with Subset-Norm"),
    "adamw-snsm": _recipe(snsm.AdamWSNSM, "AdamW-SN + Subspace-Momentum (SVD projector)"),
    "adamw-snsm-emb": _recipe(snsm.AdamWSNSM, "AdamW-SNSM with the embeddings under SN/SM too", embeddings=True),
    "adamw-snsm-sync": _recipe(snsm.AdamWSNSM, "AdamW-SNSM, every matrix refreshes on the same step",
                               stagger=False),
    "adamw-snsm-randomized": _recipe(snsm.AdamWSNSM, "AdamW-SNSM, randomized projector", proj="randomized"),
    "adamw-snsm-srht": _recipe(snsm.AdamWSNSM, "AdamW-SNSM, SRHT projector", proj="srht"),
    "rmsprop-sn": _recipe(snsm.RMSpropSN, "RMSprop with Subset-Norm, no momentum"),
    "adagrad-sn": _recipe(snsm.AdaGradSN, "AdaGrad with Subset-Norm, momentum 0.9", momentum=0.9),
    "adagrad-snsm": _recipe(snsm.AdaGradSNSM, "AdaGrad-SN + Subspace-Momentum (SVD projector)", momentum=0.9),
    "sgd-sm": _recipe(snsm.SGDSM, "SGD with Subspace-Momentum", momentum=0.9),
    "adagrad-norm": _recipe(snsm.AdaGradNorm, "AdaGrad-Norm (one accumulator per matrix), momentum 0.9",
                            momentum=0.9),
    "adago": _recipe(snsm.AdaGO, "AdaGO (AdamW on the coordinate-wise groups)"),
    "loft": _recipe(snsm.LoFTAdamW, "LoFT on a peft model's LoRA pairs (AdamW on the other trainable parameters)",
                    takes_model=True),
    "loft-sn": _recipe(snsm.LoFTAdamW, "LoFT with a Subset-Norm second moment", takes_model=True,
                       second_moment="subset"),
})

#: options of :func:`build_optimizer` that shape the groups rather than the optimizer
GROUPING_OPTIONS = ("embeddings", "lora_subset_size", "aux_lr")

#: per-matrix options: they go to the linear weights' group (``subset_size`` and the subspace ones)
_MATRIX_OPTIONS = ("subset_size",) + SUBSPACE_OPTIONS


def _constructor_options(cls) -> Tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters
    return tuple(n for n, p in params.items() if n not in ("self", "params", "model")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _recipe_for(name: Any) -> Recipe:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"unknown snsm optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def allowed_options(name: str) -> Tuple[str, ...]:
    """The options :func:`build_optimizer` takes for ``name``."""
    recipe = _recipe_for(name)
    return _constructor_options(recipe.cls) + (() if recipe.takes_model else GROUPING_OPTIONS)


def check_options(name: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The name's options merged with ``options``; ``ValueError`` for an unknown name or option,
    or a value the optimizer refuses (checked by building it for a small stand-in model)."""
    recipe = _recipe_for(name)
    allowed = allowed_options(name)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        extra = " (no Subspace-Momentum: use an -snsm / -sm name)" if set(unknown) & set(SUBSPACE_OPTIONS) \
            and not recipe.subspace else ""
        raise ValueError(f"{name} takes no option {unknown[0]!r}{extra}; allowed: {', '.join(allowed)}")
    merged = {**recipe.options, **options}
    stand_in = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 6), nn.LayerNorm(6))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _build(stand_in, recipe, merged)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from e
    return merged


def _build(model: nn.Module, recipe: Recipe, options: Dict[str, Any]) -> torch.optim.Optimizer:
    options = dict(options)
    if recipe.takes_model:
        return recipe.cls(model, **options)
    embeddings = options.pop("embeddings", False)
    lora_subset_size = options.pop("lora_subset_size", "same")
    aux_lr = options.pop("aux_lr", None)
    matrix = {k: options.pop(k) for k in _MATRIX_OPTIONS if k in options}
    if not isinstance(embeddings, bool):
        raise ValueError(f"Invalid embeddings: {embeddings!r} (expected True or False)")
    groups = snsm.param_groups(model, embeddings=embeddings, lora_subset_size=lora_subset_size, **matrix)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    groups = _split_decay(groups, options.get("weight_decay"))
    if aux_lr is not None:
        for group in groups:
            if group.get("subset_size", "") is None and group.get("rank", "") is None:
                group["lr"] = aux_lr
    return recipe.cls(groups, **options)


def _split_decay(groups: List[Dict[str, Any]], weight_decay: Any) -> List[Dict[str, Any]]:
    """Vectors (biases, norm scales) without weight decay, as ``transformers.Trainer`` does."""
    if not weight_decay:
        return groups
    out = []
    for group in groups:
        vectors = [p for p in group["params"] if p.ndim < 2]
        if not vectors:
            out.append(group)
            continue
        matrices = [p for p in group["params"] if p.ndim >= 2]
        if matrices:
            out.append({**group, "params": matrices})
        out.append({**group, "params": vectors, "weight_decay": 0.0})
    return out


def build_optimizer(model: nn.Module, name: str, **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) for ``model``'s trainable parameters,
    grouped by module type (see the module doc for the options). ``ValueError`` names the allowed
    names or options when one is unknown."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_optimizer expects an nn.Module, got {type(model).__name__}")
    merged = check_options(name, options)
    return _build(model, OPTIMIZERS[name], merged)
