r"""LoFT: LoRA factors stepped so that the adapter moves like AdamW on the full weight.

From "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning" (Tastan,
Laskaridis, Takáč, Nandakumar & Horváth, arXiv 2505.21289, ICLR 2026),
written from the paper's equations and checked against the algorithm of the
authors' release (``tnurbek/loft``); no code of theirs is used.

**Notation** (peft's convention). A LoRA layer computes ``W = W0 + s B A``
with ``A = lora_A.<adapter>.weight`` (``r x n``), ``B =
lora_B.<adapter>.weight`` (``m x r``) and ``s = lora_alpha / r``. Let
``G = dL/dW`` (never formed), so ``grad_A = s B^T G`` and ``grad_B = s G A^T``.

**The scale s is folded in.** We work with the effective partners
``b = s B`` (for A's step) and ``a = s A`` (for B's step), both taken from
the forward of this step (before anything moves). Then ``grad_A = b^T G``,
``grad_B = G a^T``, and every step below moves ``W`` by the same amount
whatever ``alpha`` is: ``lr`` means AdamW's ``lr`` on ``W`` for any
``alpha/r`` (the authors' code ignores ``s`` and their notebooks set
``alpha = r``; with ``s != 1`` it would step ``W`` by ``s * lr``).

**One step of one adapter**, step count ``t``, ``c1 = 1 - beta1^t``,
``c2 = 1 - beta2^t``:

1. Preconditioners (damped inverse Gram matrices of the partners):

   .. math::

       P_A = (b^\top b + d_A I)^{-1},\quad P_B = (a a^\top + d_B I)^{-1},\quad
       g_A = P_A\,\mathrm{grad}_A,\quad g_B = \mathrm{grad}_B\,P_B

   ``b g_A`` and ``g_B a`` are the full gradient projected onto the
   adapter's column and row space (exactly ``G`` at full rank).
2. Calibration: where a factor's partner moved in the previous step, its
   moments are re-expressed in the new partner's coordinates
   (``b_prev``, ``a_prev``: the partners the moments were last written with):

   .. math::

       R_A = P_A b^\top b_{prev},\ M_A \leftarrow R_A M_A,\
       C_{A,j} \leftarrow R_A C_{A,j} R_A^\top;\qquad
       R_B = a_{prev} a^\top P_B,\ M_B \leftarrow M_B R_B,\
       C_{B,i} \leftarrow R_B^\top C_{B,i} R_B

   This is the **consistent** form: ``b R_A g`` is the projection of
   ``b_prev g``, so a column ``g`` of old coordinates becomes ``R_A g``
   and its outer product ``R_A g g^T R_A^T``. The released code applies the
   second moment's transform transposed, which breaks the full-rank
   equivalence below as soon as ``beta2 > 0`` (0.79 relative error in ``W``
   after 5 steps with betas (0.9, 0.999)); we do not reproduce that.
3. Moments of both factors, every step (in the factor's coordinates):

   .. math::

       M_A \leftarrow \beta_1 M_A + (1-\beta_1) g_A,\quad
       C_{A,j} \leftarrow \beta_2 C_{A,j} + (1-\beta_2) g_{A,:j} g_{A,:j}^\top\ (j \le n)

   and ``M_B``, ``C_{B,i}`` with the rows ``g_{B,i:}`` (``i <= m``).
   ``b M_A`` is AdamW's first moment of ``W`` and
   ``V_ij = b_i^T C_{A,j} b_i`` its second (``b_i``: row ``i`` of ``b``).
4. Update of the active factor (AdamW's direction in the full space,
   projected back onto the factor), weight decay first as in
   ``torch.optim.AdamW``:

   .. math::

       U = \frac{b M_A}{\sqrt{\max(V, 0)} / \sqrt{c_2} + \epsilon},\quad
       A \leftarrow (1 - \eta\lambda) A - \frac{\eta}{c_1} P_A b^\top U

       U = \frac{M_B a}{\sqrt{\max(V, 0)} / \sqrt{c_2} + \epsilon},\ V_{ij} = a_j^\top C_{B,i} a_j,\quad
       B \leftarrow (1 - \eta\lambda) B - \frac{\eta}{c_1} U a^\top P_B

   ``V`` is computed as ``K Chat^T`` (``K``: the ``m x r^2`` rows
   ``b_i (x) b_i``; ``Chat``: ``C_A`` flattened to ``n x r^2``), so the
   transients are three ``m x n`` matrices and never an ``r x m x n`` one.

**Alternation** (the paper's and the code's schedule): one factor moves per
step, **B on odd steps** (it starts at zero in peft, so A's first step would
be zero), **A on even steps**; both factors' moments update every step, and
every adapter is in lock-step (each pair's own step count, which is the same
for all pairs when every adapter gets a gradient every step). Only the
factor that moves is weight-decayed. ``joint=True`` moves both factors every
step (from the forward's ``a`` and ``b``): the "no alternation" arm of the
authors' toy experiment, offered for that ablation only (it is not AdamW at
full rank: both projections step ``W``).

**Full-rank property.** With ``m = n = r``, invertible factors, damping 0,
``weight_decay=0``, no clipping, LoFT's ``B_t A_t`` equals the ``W_t`` of
``torch.optim.AdamW`` started at ``B_0 A_0`` with the same ``lr``, betas and
``eps`` (tested in float64: relative error below 1e-9).

**Weight decay** is decoupled and scaled by ``lr`` (``A <- (1 - lr wd) A``,
torch.optim.AdamW's); the authors' code subtracts ``wd * A`` without ``lr``.
It decays the factors, not ``W - W0``.

**Clipping** (``max_grad_norm``): the paper's global norm over the active
factors' full-space projected gradients (``||b g_A||``, ``||g_B a||``,
computed from ``r x r`` Gram matrices) and the other parameters' gradients;
every gradient is scaled by ``min(1, max_grad_norm / (norm + 1e-6))``. Turn
the trainer's own clipping off when using it (``max_grad_norm=0`` in
``transformers.TrainingArguments``): it would clip the factors' raw gradients.

**Subset-Norm second moment** (``second_moment="subset"``, our variant, not
the paper's): instead of the ``r x r`` matrices, one value per column ``j`` of
A's full-space update (``n`` values) and per row ``i`` of B's (``m`` values),
the mean square of the projected gradient over that column or row:

.. math::

    v_{A,j} \leftarrow \beta_2 v_{A,j} + (1-\beta_2)\,\lVert b g_{A,:j}\rVert^2 / m,\quad
    v_{B,i} \leftarrow \beta_2 v_{B,i} + (1-\beta_2)\,\lVert g_{B,i:} a\rVert^2 / n

and ``V_ij = v_{A,j}`` (A) or ``v_{B,i}`` (B). The mean (not the library's
Subset-Norm sum) keeps AdamW's learning-rate scale. ``v`` is a statistic of
the full-space gradient, so it is not re-projected when the partner moves.
The update needs no ``m x n`` transient at all:
``A <- A - (lr/c1) P_A (b^T b) M_A / D`` with ``D_j = sqrt(v_j / c2) + eps``.

**State per adapter** (floats; ``m x n`` weight, rank ``r``):
``M_A`` (``r n``), ``M_B`` (``m r``), ``C_A`` (``n r^2``), ``C_B`` (``m r^2``),
and the partner copies ``b_prev`` (``m r``), ``a_prev`` (``r n``):
``(m + n)(2r + r^2)``; with ``second_moment="subset"`` ``(m + n)(2r + 1)``;
LoRA + AdamW keeps ``2r(m + n)`` (:func:`state_floats`).

**Other parameters** (whatever is trainable and is not a LoRA factor pair:
``modules_to_save``, biases, peft's embedding adapters ``lora_embedding_A/B``,
DoRA magnitudes) are stepped by ``torch.optim.AdamW``'s own functional step
(bit for bit the same arithmetic) with the group's ``lr``, betas, ``eps`` and
``weight_decay``; the authors use plain Adam there.

**Finding the pairs.** Factors are recognised by peft's names
``<module>.lora_A.<adapter>.weight`` / ``<module>.lora_B.<adapter>.weight``;
a pair is the A and B of the same module and the same adapter, and must be
in the same param group. Pass ``LoFTAdamW(model)`` (trainable parameters,
and ``s`` read from each peft layer's ``scaling``, which also covers rsLoRA
and ``alpha_pattern``) or ``LoFTAdamW(model.named_parameters(), scaling=s)``
(or ``model=model`` instead of ``scaling``). Conv adapters work too (A
viewed as ``r x (in k k)``, B ``(out, r, 1, 1)`` as ``out x r``).

**Not supported.** Steps inside backward (:meth:`LoFTAdamW.step_in_backward`
raises): a factor's step needs its partner's gradient and the partner as it
was in the forward, and the clipping needs every gradient.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim.adamw import adamw as torch_adamw

from ._base import StrictOptimizer
from ._common import check_beta, check_range, compute_dtype, ema_
from .subset_norm import accumulate_sums_

__all__ = ["LoFTAdamW", "lora_pairs", "state_floats", "SECOND_MOMENTS"]

logger = logging.getLogger(__name__)

SECOND_MOMENTS = ("full", "subset")

#: peft's name of a LoRA factor: ``<module>.lora_A.<adapter>.weight`` (module may be empty)
LORA_NAME = re.compile(r"^(?:(?P<module>.+)\.)?lora_(?P<side>[AB])\.(?P<adapter>[^.]+)\.weight$")


def state_floats(m: int, n: int, r: int, second_moment: str = "full") -> int:
    """Floats of LoFT's state for one adapter of an ``m x n`` weight at rank ``r`` (counters aside):
    ``(m + n)(2r + r^2)`` (``"full"``) or ``(m + n)(2r + 1)`` (``"subset"``). LoRA + AdamW: ``2r(m + n)``."""
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"Invalid second_moment: {second_moment!r} (allowed: {', '.join(SECOND_MOMENTS)})")
    return (m + n) * (2 * r + (r * r if second_moment == "full" else 1))


class Pair(NamedTuple):
    """One LoRA adapter: its factors, their matrix views' sizes and where it lives."""

    module: str
    adapter: str
    A: torch.Tensor  # r x n (viewed)
    B: torch.Tensor  # m x r (viewed)
    m: int
    n: int
    r: int


def lora_pairs(names: List[str], params: List[torch.Tensor]) -> Tuple[List[Pair], List[int]]:
    """The LoRA factor pairs among named parameters, and the indices of the other parameters.

    Raises ``ValueError`` for a factor without its partner, a module/adapter named twice, or
    factors whose shapes are not those of a LoRA pair (A ``r x n``, B ``m x r`` with the same
    ``r``; conv adapters: A ``(r, in, k, k)``, B ``(out, r, 1, 1)``).
    """
    found: Dict[Tuple[str, str], Dict[str, Tuple[str, torch.Tensor]]] = {}
    others = []
    for index, (name, p) in enumerate(zip(names, params)):
        match = LORA_NAME.match(name) if isinstance(name, str) else None
        if match is None:
            others.append(index)
            continue
        key = (match["module"] or "", match["adapter"])
        sides = found.setdefault(key, {})
        if match["side"] in sides:
            raise ValueError(f"LoFTAdamW: two lora_{match['side']} factors for module {key[0]!r}, adapter "
                             f"{key[1]!r}: {sides[match['side']][0]!r} and {name!r}")
        sides[match["side"]] = (name, p)
    pairs = []
    for (module, adapter), sides in found.items():
        for side, other in (("A", "B"), ("B", "A")):
            if side in sides and other not in sides:
                raise ValueError(
                    f"LoFTAdamW: {sides[side][0]!r} has no lora_{other} partner (module {module!r}, adapter "
                    f"{adapter!r}) among the trainable parameters of its param group: a LoRA pair's two "
                    "factors must both be trainable and in the same group")
        (name_a, a), (name_b, b) = sides["A"], sides["B"]
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"LoFTAdamW: {name_a!r} {tuple(a.shape)} and {name_b!r} {tuple(b.shape)} do not look "
                             "like LoRA factors (both must be matrices, or conv kernels)")
        r, n = a.shape[0], math.prod(a.shape[1:])
        m = b.shape[0]
        if b.shape[1] != r or math.prod(b.shape[2:]) != 1 or r == 0:
            raise ValueError(
                f"LoFTAdamW: {name_a!r} {tuple(a.shape)} and {name_b!r} {tuple(b.shape)} do not look like a LoRA "
                f"pair: A must be r x n and B m x r with the same r (got r = {a.shape[0]} from A and "
                f"{b.shape[1]} from B)")
        pairs.append(Pair(module, adapter, a, b, m, n, r))
    return pairs, others


def _model_scaling(model: nn.Module, pair: Pair) -> float:
    """``s`` of a pair from its peft layer (``layer.scaling[adapter]``), checking that the layer holds
    exactly these two tensors."""
    try:
        layer = model.get_submodule(pair.module) if pair.module else model
    except AttributeError:
        raise ValueError(f"LoFTAdamW: the model has no module {pair.module!r} (the LoRA factors' names do not "
                         "belong to the model that was given)") from None
    scaling = getattr(layer, "scaling", None)
    try:
        weight_a = layer.lora_A[pair.adapter].weight
        weight_b = layer.lora_B[pair.adapter].weight
    except (AttributeError, KeyError, TypeError):
        weight_a = weight_b = None
    if weight_a is not pair.A or weight_b is not pair.B or not isinstance(scaling, dict) or \
            pair.adapter not in scaling:
        raise ValueError(f"LoFTAdamW: module {pair.module!r} is not a peft LoRA layer holding these factors of "
                         f"adapter {pair.adapter!r} (expected lora_A/lora_B[{pair.adapter!r}] and a scaling dict)")
    return float(scaling[pair.adapter])


def _damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``(gram + damping I)^-1`` (r x r), computed in float64; the pseudo-inverse when ``damping == 0``
    (a zero factor, as peft's B at first, then gives a zero step instead of an error)."""
    k = gram.to(torch.float64)
    if damping > 0:
        k = k + damping * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        inverse = torch.linalg.inv(k)
    else:
        inverse = torch.linalg.pinv(k, hermitian=True)
    return inverse.to(gram.dtype)


def _number(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class LoFTAdamW(StrictOptimizer):
    r"""LoFT for peft LoRA adapters (alternating, preconditioned, calibrated moments); AdamW for the rest.

    See :mod:`snsm.loft` for the update equations, the alternation (B on odd
    steps, A on even), the consistent calibration, the folding of ``s``, the
    Subset-Norm variant and the state's size.

    Args:
        params: a peft model (its trainable parameters; ``s`` read from its
            LoRA layers), or named parameters ``model.named_parameters()``
            (or groups of them) with ``scaling`` or ``model``.
        lr: ``eta``, AdamW's learning rate on ``W`` (and on the other parameters).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(V / c2)``, ``[0, inf)``.
        weight_decay: ``lambda``, decoupled and lr-scaled, on the moving factor.
        damping: ``d_A`` and ``d_B`` (a number for both, or a pair), ``[0, inf)``;
            0 uses pseudo-inverses.
        scaling: ``s = alpha / r`` of the group's adapters (``None``: read from
            ``model``; required without one).
        model: the peft model the named parameters come from (for ``s``).
        second_moment: ``"full"`` (the paper's ``r x r`` matrices) or ``"subset"``.
        joint: move both factors every step (the no-alternation ablation).
        max_grad_norm: the paper's global clipping (``None``: off), ``(0, inf)``.
        maximize: ascend instead of descend (the gradient is negated).
    """

    def __init__(
        self,
        params: Union[nn.Module, Iterable],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        damping: Union[float, Tuple[float, float]] = (1e-6, 1e-8),
        scaling: Optional[float] = None,
        model: Optional[nn.Module] = None,
        second_moment: str = "full",
        joint: bool = False,
        max_grad_norm: Optional[float] = None,
        maximize: bool = False,
    ):
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("LoFTAdamW: got a model as params and another one as model=")
            model = params
            params = [(name, p) for name, p in params.named_parameters() if p.requires_grad]
            if not params:
                raise ValueError("LoFTAdamW: the model has no trainable parameters")
        self._model = model
        self._pairs: Optional[dict] = None
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, damping=damping, scaling=scaling,
                        second_moment=second_moment, joint=joint, max_grad_norm=max_grad_norm, maximize=maximize)
        super().__init__(params, defaults)
        table = self._pair_table()
        logger.info("LoFTAdamW: %d LoRA pairs, %d other parameters (AdamW)", len(table) // 2,
                    sum(1 for p in self.parameters() if p not in table))
        if not table:
            self.warn_once("no-pairs", "LoFTAdamW found no LoRA factor pairs (peft's <module>.lora_A.<adapter>."
                                       "weight / lora_B): every parameter steps with plain AdamW")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._model = None
        self._pairs = None

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a group of named parameters. With a model, the group's pairs take ``s`` from their peft
        layers; a group whose adapters have different ``s`` is split into one group per value."""
        pieces = self._split_by_model_scaling(dict(param_group))
        added = 0
        try:
            for piece in pieces:
                super().add_param_group(piece)
                added += 1
        except (TypeError, ValueError):
            del self.param_groups[len(self.param_groups) - added:]
            raise
        finally:
            self._pairs = None

    def _split_by_model_scaling(self, group: dict) -> List[dict]:
        model = getattr(self, "_model", None)
        params = group.get("params")
        if model is None or isinstance(params, torch.Tensor) or params is None:
            return [group]
        params = list(params)
        group["params"] = params
        if not params or not all(isinstance(x, tuple) and len(x) == 2 for x in params):
            return [group]  # unnamed: validate_group says what is missing
        names = [name for name, _ in params]
        pairs, others = lora_pairs(names, [p for _, p in params])
        if not pairs:
            return [group]
        wanted = group.get("scaling", self.defaults["scaling"])
        by_scaling: Dict[float, list] = {}
        for pair in pairs:
            s = _model_scaling(model, pair)
            if wanted is not None and not math.isclose(_number(wanted), s, rel_tol=1e-12):
                raise ValueError(f"LoFTAdamW: scaling={wanted} was given, but the model's adapter "
                                 f"{pair.adapter!r} of {pair.module!r} has alpha/r = {s}")
            by_scaling.setdefault(s, []).append(pair)
        position = {id(p): i for i, (_, p) in enumerate(params)}
        pieces = []
        for k, (s, members) in enumerate(by_scaling.items()):
            indices = sorted([position[id(x.A)] for x in members] + [position[id(x.B)] for x in members]
                             + (others if k == 0 else []))
            pieces.append(dict(group, params=[params[i] for i in indices], scaling=s))
        return pieces

    def normalize_group(self, group: dict) -> None:
        super().normalize_group(group)
        for key in ("betas", "damping"):
            if isinstance(group[key], list):
                group[key] = tuple(group[key])
        if isinstance(group["damping"], (int, float)) and not isinstance(group["damping"], bool):
            group["damping"] = (float(group["damping"]), float(group["damping"]))

    def validate_group(self, group: dict) -> None:
        """The options (:meth:`validate_options`), the names and the pairs they form, and ``s`` where
        the group has pairs."""
        self.validate_options(group)
        names = group.get("param_names")
        if names is None:
            raise ValueError("LoFTAdamW finds LoRA pairs by their names: pass the peft model "
                             "(LoFTAdamW(model)) or its named parameters (LoFTAdamW(model.named_parameters(), "
                             "scaling=alpha / r)), not bare parameters")
        pairs, _ = lora_pairs(names, group["params"])
        if pairs and group["scaling"] is None:
            raise ValueError(
                "LoFTAdamW needs the LoRA scale s = lora_alpha / r of the adapters it steps (it folds s into "
                "the step, so that lr is AdamW's lr on W for any alpha): pass the model (LoFTAdamW(model) or "
                "model=model) or scaling=alpha / r")

    def validate_options(self, group: dict) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid option of ``group``."""
        check_range("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, tuple) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        check_range("eps", group["eps"], 0.0, math.inf, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0, math.inf, high_open=True)
        damping = group["damping"]
        if not isinstance(damping, tuple) or len(damping) != 2:
            raise ValueError(f"Invalid damping: {damping!r} (expected a number or a pair (d_A, d_B))")
        check_range("damping[0]", damping[0], 0.0, math.inf, high_open=True)
        check_range("damping[1]", damping[1], 0.0, math.inf, high_open=True)
        if group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(f"Invalid second_moment: {group['second_moment']!r} "
                             f"(allowed: {', '.join(map(repr, SECOND_MOMENTS))})")
        if not isinstance(group["joint"], bool):
            raise TypeError(f"Invalid joint: {group['joint']!r} (expected True or False)")
        clip = group["max_grad_norm"]
        if clip != self.defaults["max_grad_norm"]:
            raise ValueError(f"Invalid max_grad_norm: {clip!r} in a param group: the clipping is global, set it "
                             f"once in the constructor (which has {self.defaults['max_grad_norm']!r})")
        if clip is not None:
            check_range("max_grad_norm", clip, 0.0, math.inf, high_open=True)
            if _number(clip) == 0.0:
                raise ValueError("Invalid max_grad_norm: 0.0 (allowed range (0, inf); None turns clipping off)")
        s = group["scaling"]
        if s is not None:
            check_range("scaling", s, 0.0, math.inf, high_open=True)
            if _number(s) == 0.0:
                raise ValueError("Invalid scaling: 0.0 (allowed range (0, inf): s = lora_alpha / r)")

    def rules_record(self, group: dict) -> Any:
        return ["loft", group["second_moment"]]

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`snsm._base.StrictOptimizer.load_state_dict`; the pairs are found again from the
        loaded groups' names."""
        self._pairs = None
        try:
            super().load_state_dict(state_dict)
        finally:
            self._pairs = None

    def _pair_table(self) -> dict:
        """``param -> (side, pair, group)`` for every LoRA factor of every group (a cache)."""
        if self._pairs is None:
            table = {}
            for group in self.param_groups:
                pairs, _ = lora_pairs(group["param_names"], group["params"]) if "param_names" in group else ([], [])
                for pair in pairs:
                    table[pair.A] = ("A", pair, group)
                    table[pair.B] = ("B", pair, group)
            self._pairs = table
        return self._pairs

    # ---------------------------------------------------------------- state
    def state_spec(self, p: torch.Tensor, group: dict) -> Dict[str, tuple]:
        entry = self._pair_table().get(p)
        if entry is None:  # AdamW, as torch.optim.AdamW keeps it
            return {"exp_avg": (tuple(p.shape), p.dtype), "exp_avg_sq": (tuple(p.shape), p.dtype)}
        side, pair, _ = entry
        dtype = compute_dtype(p)
        m, n, r = pair.m, pair.n, pair.r
        full = group["second_moment"] == "full"
        if side == "A":
            return {"exp_avg": ((r, n), dtype), "exp_avg_sq": ((n, r, r) if full else (n,), dtype),
                    "partner": ((m, r), dtype)}
        return {"exp_avg": ((m, r), dtype), "exp_avg_sq": ((m, r, r) if full else (m,), dtype),
                "partner": ((r, n), dtype)}

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        for key, (shape, dtype) in self.state_spec(p, group).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        entry = self._pair_table().get(p)
        if entry is not None:  # the partner as the moments will first be written with
            side, pair, _ = entry
            partner = pair.B if side == "A" else pair.A
            state["partner"].copy_(partner.detach().reshape(state["partner"].shape))

    # ---------------------------------------------------------------- in backward: refused
    def step_in_backward(self, model=None, *, clip=None, max_norm: float = 1.0):
        """Refused: raises ``NotImplementedError`` (see below)."""
        raise NotImplementedError(
            "LoFTAdamW cannot step inside backward: a LoRA factor's step needs its partner's gradient (both "
            "factors' moments update every step, preconditioned by the other factor) and the partner as it was "
            "in the forward, which the partner's own in-backward step would already have changed (lora_B's "
            "gradient arrives before lora_A's); the paper's clipping also needs every gradient. Call "
            "opt.step() after backward")

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Refused (see :meth:`step_in_backward`)."""
        self.step_in_backward()

    # ---------------------------------------------------------------- step
    def prepare_step(self):
        """Every group validated, every gradient and piece of state checked: nothing written."""
        table = self._pair_table()
        plan = []
        for group in self.param_groups:
            self.validate_options(group)
            pairs, others = [], []
            for p in group["params"]:
                entry = table.get(p)
                if entry is None:
                    if p.grad is not None:
                        self.check_grad(p)
                        self.check_state(p, group, "was a LoRA factor renamed?")
                        others.append(p)
                    continue
                side, pair, _ = entry
                if side != "A":
                    continue
                has = (pair.A.grad is not None, pair.B.grad is not None)
                if has == (False, False):
                    continue
                if group["scaling"] is None:
                    raise ValueError("LoFTAdamW: a param group with LoRA pairs has scaling=None (s = lora_alpha / r)")
                if has != (True, True):
                    missing = "lora_B" if has[0] else "lora_A"
                    raise ValueError(f"LoFTAdamW: the adapter {pair.adapter!r} of {pair.module!r} has a gradient "
                                     f"for only one factor ({missing} has none): LoFT steps both together")
                for factor in (pair.A, pair.B):
                    self.check_grad(factor)
                    self.check_state(factor, group, "was the checkpoint written with another second_moment?")
                steps = [self.state[f]["step"].item() if self.state.get(f) else None for f in (pair.A, pair.B)]
                if steps[0] != steps[1]:
                    raise ValueError(f"LoFTAdamW: the factors of adapter {pair.adapter!r} of {pair.module!r} are at "
                                     f"steps {steps[0]} and {steps[1]}: a LoRA pair steps together (a checkpoint "
                                     "of another model?)")
                pairs.append(pair)
            plan.append((group, pairs, others))
        return plan

    def apply_step(self, plan) -> None:
        for group, pairs, others in plan:
            for p in [q for pair in pairs for q in (pair.A, pair.B)] + others:
                if not self.state[p]:
                    self._init_state(p, group)
        clip = self.defaults["max_grad_norm"]
        prepared = []  # (group, pair, P_A, P_B, g_A, g_B, b, a, active A, active B), all before any write
        squares = []
        for group, pairs, others in plan:
            for pair in pairs:
                entry = self._precondition(group, pair)
                prepared.append(entry)
                if clip is not None:
                    squares.append(self._projected_square_norm(entry))
            if clip is not None:
                squares += [p.grad.detach().to(compute_dtype(p)).square().sum() for p in others]
        factor = None
        if clip is not None and squares:  # summed in float64 (a few scalars)
            total = torch.stack([x.to(squares[0].device, torch.float64) for x in squares]).sum().sqrt()
            factor = (_number(clip) / (total + 1e-6)).clamp(max=1.0)
        for entry in prepared:
            self._pair_step(entry, factor)
        for group, _, others in plan:
            if others:
                self._adamw_step(group, others, factor)

    def _precondition(self, group: dict, pair: Pair) -> tuple:
        """``(group, pair, P_A, P_B, g_A, g_B, b, a)`` from the forward's factors (``b = s B``, ``a = s A``)."""
        s = _number(group["scaling"])
        dtype = compute_dtype(pair.A)
        a = torch.mul(pair.A.detach().reshape(pair.r, pair.n).to(dtype), s)
        b = torch.mul(pair.B.detach().reshape(pair.m, pair.r).to(dtype), s)
        grad_a = self.gradient(pair.A, group).reshape(pair.r, pair.n).to(dtype)
        grad_b = self.gradient(pair.B, group).reshape(pair.m, pair.r).to(dtype)
        d_a, d_b = (_number(d) for d in group["damping"])
        p_a = _damped_inverse(b.T @ b, d_a)
        p_b = _damped_inverse(a @ a.T, d_b)
        return group, pair, p_a, p_b, p_a @ grad_a, grad_b @ p_b, b, a

    def _projected_square_norm(self, entry: tuple) -> torch.Tensor:
        """``||b g_A||^2`` and/or ``||g_B a||^2`` of the factors that move this step (r x r Gram products)."""
        group, pair, _, _, g_a, g_b, b, a = entry
        move_a, move_b = _moving(group, int(self.state[pair.A]["step"].item()) + 1)
        total = torch.zeros((), dtype=g_a.dtype, device=g_a.device)
        if move_a:
            total = total + (g_a * ((b.T @ b) @ g_a)).sum()
        if move_b:
            total = total + (g_b * (g_b @ (a @ a.T))).sum()
        return total

    def _pair_step(self, entry: tuple, factor: Optional[torch.Tensor]) -> None:
        group, pair, p_a, p_b, g_a, g_b, b, a = entry
        if factor is not None:
            g_a = g_a * factor.to(g_a.dtype)
            g_b = g_b * factor.to(g_b.dtype)
        state_a, state_b = self.state[pair.A], self.state[pair.B]
        state_a["step"] += 1
        state_b["step"] += 1
        t = int(state_a["step"].item())
        move_a, move_b = _moving(group, t)
        beta1, beta2 = (float(x) for x in group["betas"])
        s = _number(group["scaling"])
        full = group["second_moment"] == "full"
        m_a, v_a, m_b, v_b = state_a["exp_avg"], state_a["exp_avg_sq"], state_b["exp_avg"], state_b["exp_avg_sq"]
        # 2. calibration: the factor whose partner moved in the previous step (the one that moves now)
        if t > 1 and move_a:
            r_a = p_a @ (b.T @ (state_a["partner"] * s))
            m_a.copy_(r_a @ m_a)
            if full:
                v_a.copy_(r_a @ v_a @ r_a.T)
        if t > 1 and move_b:
            r_b = ((state_b["partner"] * s) @ a.T) @ p_b
            m_b.copy_(m_b @ r_b)
            if full:
                v_b.copy_(r_b.T @ v_b @ r_b)
        state_a["partner"].copy_(pair.B.detach().reshape(pair.m, pair.r))  # the forward's, unscaled
        state_b["partner"].copy_(pair.A.detach().reshape(pair.r, pair.n))
        # 3. moments of both factors
        ema_(m_a, g_a, beta1)
        ema_(m_b, g_b, beta1)
        if full:
            g_at = g_a.T
            v_a.baddbmm_(g_at.unsqueeze(2), g_at.unsqueeze(1), beta=beta2, alpha=1.0 - beta2)
            v_b.baddbmm_(g_b.unsqueeze(2), g_b.unsqueeze(1), beta=beta2, alpha=1.0 - beta2)
        else:
            accumulate_sums_(v_a, (g_a * ((b.T @ b) @ g_a)).sum(0).div_(pair.m), beta2)
            accumulate_sums_(v_b, (g_b * (g_b @ (a @ a.T))).sum(1).div_(pair.n), beta2)
        # 4. the update of the moving factor(s), all from the forward's a and b
        c1 = 1.0 - beta1 ** t
        root_c2 = math.sqrt(1.0 - beta2 ** t)
        eps = _number(group["eps"])
        lr = _number(group["lr"])
        wd = _number(group["weight_decay"])
        directions = []
        if move_a:
            if full:
                k = (b.unsqueeze(2) * b.unsqueeze(1)).reshape(pair.m, pair.r * pair.r)
                denom = (k @ v_a.reshape(pair.n, -1).T).clamp_(min=0).sqrt_().div_(root_c2).add_(eps)
                direction = p_a @ (b.T @ (b @ m_a).div_(denom))
            else:
                direction = (p_a @ ((b.T @ b) @ m_a)).div_(v_a.sqrt().div_(root_c2).add_(eps))
            directions.append((pair.A, direction))
        if move_b:
            if full:
                k = (a.T.unsqueeze(2) * a.T.unsqueeze(1)).reshape(pair.n, pair.r * pair.r)
                denom = (v_b.reshape(pair.m, -1) @ k.T).clamp_(min=0).sqrt_().div_(root_c2).add_(eps)
                direction = ((m_b @ a).div_(denom) @ a.T) @ p_b
            else:
                direction = ((m_b @ (a @ a.T)) @ p_b).div_(v_b.sqrt().div_(root_c2).add_(eps).unsqueeze(1))
            directions.append((pair.B, direction))
        for param, direction in directions:  # W = W0 + b A = W0 + B a: the factor moves by the direction
            if wd != 0.0:
                param.mul_(1.0 - lr * wd)
            param.add_(direction.reshape(param.shape).to(param.dtype), alpha=-lr / c1)

    def _adamw_step(self, group: dict, params: list, factor: Optional[torch.Tensor]) -> None:
        """torch.optim.AdamW's functional step for the parameters that are not LoRA factors."""
        grads = [p.grad if factor is None else p.grad * factor.to(p.grad.device, p.grad.dtype) for p in params]
        states = [self.state[p] for p in params]
        beta1, beta2 = (float(x) for x in group["betas"])
        torch_adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                    [s["step"] for s in states], foreach=None, fused=None, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=_number(group["lr"]), weight_decay=_number(group["weight_decay"]),
                    eps=_number(group["eps"]), maximize=group["maximize"])


def _moving(group: dict, step: int) -> Tuple[bool, bool]:
    """Which factors move at ``step``: both under ``joint``, else B on odd steps and A on even ones."""
    if group["joint"]:
        return True, True
    return step % 2 == 0, step % 2 == 1
