"""Route a model's parameters to the paper's groups by module type.

The paper applies Subset-Norm and Subspace-Momentum to the weights of linear
layers (the output head included) and keeps embeddings, normalization scales
and biases coordinate-wise. :func:`param_groups` builds that split from module
types, never from parameter names.
"""
from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, *, embeddings: bool = False, **options: Any) -> List[Dict[str, Any]]:
    """Parameter groups for any snsm optimizer.

    Returns up to two groups, in this order and without empty ones:

    * ``{"params": [...], **options}``: the ``weight`` of every ``nn.Linear``
      (and of every ``nn.Embedding`` when ``embeddings=True``), which get
      Subset-Norm / Subspace-Momentum with ``options`` (e.g. ``rank=128``,
      ``proj_gap=200``, ``subset_size="auto"``; anything the optimizer takes
      per group, ``lr`` included); unset options take the optimizer's defaults.
    * ``{"params": [...], "subset_size": None, "rank": None}``: everything else
      (biases, norm scales, embeddings, parameters held directly by a module),
      coordinate-wise: plain AdamW / AdaGrad / RMSprop / SGD-momentum.

    A parameter shared by several modules appears once. It is compressed only
    if every module that holds it qualifies: a tied embedding / output head
    stays coordinate-wise unless ``embeddings=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    compress_types = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    verdict: Dict[int, bool] = {}
    order: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            qualifies = isinstance(module, compress_types) and name == "weight"
            order.setdefault(id(p), p)
            verdict[id(p)] = verdict.get(id(p), True) and qualifies
    compressed = [p for key, p in order.items() if verdict[key] and p.requires_grad]
    regular = [p for key, p in order.items() if not verdict[key] and p.requires_grad]
    groups = []
    if compressed:
        groups.append({"params": compressed, **options})
    if regular:
        groups.append({"params": regular, "subset_size": None, "rank": None})
    return groups
