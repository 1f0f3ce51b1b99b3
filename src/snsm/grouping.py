"""Route a model's parameters to the paper's groups by module type.

The paper applies Subset-Norm and Subspace-Momentum to the weights of linear
layers (the output head included) and keeps embeddings, normalization scales
and biases coordinate-wise. :func:`param_groups` builds that split from module
types, never from parameter names.

LoRA adapters (PEFT): the factors ``lora_A`` (``r x d_in``) and ``lora_B``
(``d_out x r``) of an adapted layer are matrices of rank ``<= r``. Subset-Norm
suits them (one accumulator per row of the tall frame: ``d`` accumulators,
each over ``r`` coordinates), but Subspace-Momentum does not: the momentum of
an ``r``-row matrix in a subspace of rank ``>= r`` is its full momentum, and a
smaller subspace throws away directions of an already low-rank update. So the
factors get a group of their own, Subset-Norm without subspace momentum
(``rank=None``) whatever ``rank`` is asked; the frozen base weights have
``requires_grad=False`` and are left out like any frozen parameter.
"""
from __future__ import annotations

from typing import Any, Dict, List, Set

from torch import nn

__all__ = ["param_groups", "lora_factors", "SUBSPACE_OPTIONS"]

#: the options that configure Subspace-Momentum; a LoRA group takes none of them
SUBSPACE_OPTIONS = ("rank", "proj", "proj_gap", "refresh", "stagger", "seed")

#: attributes of a PEFT LoRA layer holding its factors (``nn.ModuleDict`` of linear / conv
#: modules, or ``nn.ParameterDict`` as in AdaLoRA), per adapter name
_LORA_PAIRS = (("lora_A", "lora_B"),)
_LORA_EMBEDDING_PAIRS = (("lora_embedding_A", "lora_embedding_B"),)


def _factor_tensors(container) -> List[nn.Parameter]:
    if isinstance(container, nn.ParameterDict):
        return [p for p in container.values() if p.ndim >= 2]
    if isinstance(container, nn.ModuleDict):
        out = []
        for module in container.values():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.ndim >= 2:
                out.append(weight)
        return out
    return []


def lora_factors(model: nn.Module, *, embeddings: bool = True) -> Set[int]:
    """``id`` of every LoRA factor matrix in ``model`` (PEFT's ``lora_A`` / ``lora_B`` of every
    adapter; with ``embeddings=True`` also ``lora_embedding_A`` / ``lora_embedding_B``).

    Found by structure, without importing PEFT: a module holding both attributes of a pair as
    ``nn.ModuleDict`` / ``nn.ParameterDict``. Biases and DoRA's magnitude vectors are not
    factors (they are vectors: coordinate-wise).
    """
    pairs = _LORA_PAIRS + (_LORA_EMBEDDING_PAIRS if embeddings else ())
    found: Set[int] = set()
    for module in model.modules():
        for a, b in pairs:
            first, second = getattr(module, a, None), getattr(module, b, None)
            if isinstance(first, (nn.ModuleDict, nn.ParameterDict)) and \
                    isinstance(second, (nn.ModuleDict, nn.ParameterDict)):
                found.update(id(p) for p in _factor_tensors(first) + _factor_tensors(second))
    return found


def param_groups(model: nn.Module, *, embeddings: bool = False, lora_subset_size: Any = "same",
                 **options: Any) -> List[Dict[str, Any]]:
    """Parameter groups for any snsm optimizer.

    Returns up to three groups, in this order and without empty ones:

    * ``{"params": [...], **options}``: the ``weight`` of every ``nn.Linear``
      (and of every ``nn.Embedding`` when ``embeddings=True``), which get
      Subset-Norm / Subspace-Momentum with ``options`` (e.g. ``rank=128``,
      ``proj_gap=200``, ``subset_size="auto"``; anything the optimizer takes
      per group, ``lr`` included); unset options take the optimizer's defaults.
    * ``{"params": [...], **options without the subspace ones, "rank": None}``:
      the LoRA factors of a PEFT model (:func:`lora_factors`; those of a LoRA
      on an embedding only with ``embeddings=True``): Subset-Norm without
      subspace momentum. ``lora_subset_size`` sets their ``subset_size``;
      ``"same"`` (default) gives them the linear weights' (``options``'
      ``subset_size``, else the optimizer's default: ``"auto"``, one
      accumulator per row of the tall frame; SGD-SM keeps none), ``None``
      makes them coordinate-wise. A model without LoRA has no such group.
    * ``{"params": [...], "subset_size": None, "rank": None}``: everything else
      (biases, norm scales, embeddings, parameters held directly by a module),
      coordinate-wise: plain AdamW / AdaGrad / RMSprop / SGD-momentum.

    A parameter shared by several modules appears once. It is compressed only
    if every module that holds it qualifies: a tied embedding / output head
    stays coordinate-wise unless ``embeddings=True``. Frozen parameters
    (``requires_grad=False``, such as a LoRA model's base weights) are left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    compress_types = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    lora = lora_factors(model, embeddings=embeddings)
    verdict: Dict[int, bool] = {}
    order: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            qualifies = isinstance(module, compress_types) and name == "weight"
            order.setdefault(id(p), p)
            verdict[id(p)] = verdict.get(id(p), True) and qualifies
    trainable = [(key, p) for key, p in order.items() if p.requires_grad]
    factors = [p for key, p in trainable if key in lora]
    compressed = [p for key, p in trainable if key not in lora and verdict[key]]
    regular = [p for key, p in trainable if key not in lora and not verdict[key]]
    groups = []
    if compressed:
        groups.append({"params": compressed, **options})
    if factors:
        group = {"params": factors, **{k: v for k, v in options.items() if k not in SUBSPACE_OPTIONS}, "rank": None}
        if not (isinstance(lora_subset_size, str) and lora_subset_size == "same"):
            group["subset_size"] = lora_subset_size
        groups.append(group)
    if regular:
        groups.append({"params": regular, "subset_size": None, "rank": None})
    return groups
