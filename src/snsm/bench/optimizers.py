"""The optimizers the benchmark compares, each built the same way for the same model.

Every entry takes ``(model, lr, ctx)`` and returns a ``torch.optim.Optimizer``
with weight decay 0 (the paper's recipe). Learning rates come from
``configs/lr.json`` (written by ``--sweep lr``, which records its command).

Ours (``snsm``), grouped with :func:`snsm.param_groups`: ``nn.Linear`` weights
(attention, MLP and the output head) get Subset-Norm / Subspace-Momentum,
everything else is coordinate-wise. Subspace rank and refresh gap come from
the preset (rank ``hidden // 4``):

* ``adamw-sn``        AdamW with Subset-Norm (shape rule: one subset per row/column)
* ``adamw-snsm``      AdamW-SN + Subspace-Momentum (SVD projector)
* ``adamw-snsm-emb``  the same with the embedding also under SN/SM (``embeddings=True``)
* ``rmsprop-sn``      RMSprop with Subset-Norm, no momentum
* ``adagrad-snsm``    AdaGrad-SN (summed second moment) + Subspace-Momentum
* ``sgd-sm``          SGD with Subspace-Momentum

The projector refresh (issue 5; ``--preset refresh``): ``adamw-snsm`` with its
defaults (``svd`` basis, refreshes staggered across matrices) against

* ``adamw-snsm-sync``        every matrix refreshes on the same step (``stagger=False``),
  the paper's schedule
* ``adamw-snsm-randomized``  ``proj="randomized"`` (range finder), staggered
* ``adamw-snsm-srht``        ``proj="srht"`` (subsampled randomized Hadamard sketch), staggered

all at ``adamw-snsm``'s learning rate.

The AdaGrad family (issue 7; ``--preset family``), all grouped with
:func:`snsm.param_groups` as above:

* ``adagrad-norm``    :class:`snsm.AdaGradNorm`: ONE accumulator per linear weight
  (momentum 0.9). Its update has Frobenius norm <= lr per tensor, so its lr is
  ~sqrt(rows) larger than AdaGrad-SN's; the coordinate-wise group (embeddings,
  norms) therefore keeps ``adagrad-sn``'s lr (``aux_lr``) instead of sharing it.
* ``adagrad-sn``      :class:`snsm.AdaGradSN` (momentum 0.9), one lr for both groups
* ``adago``           :class:`snsm.AdaGO` (momentum 0.95, Nesterov off, the paper's
  update; defaults gamma 10, v0 1e-2, eps 1e-6); AdamW on the coordinate-wise
  group at ``adamw``'s lr (``aux_lr``). The paper's schedule: a constant ``eta``
  (the AdaGrad-Norm factor ``min(||G||, gamma) / v_t`` is its decay), so the
  orthogonalized groups are held at their peak lr (``OptimizerSpec.constant_lr``:
  the LR scheduler leaves them alone, with ordinary steps and inside backward); only
  the AdamW group follows the benchmark's warm-up/cosine schedule. (Under the
  cosine schedule on top, AdaGO ended at 5.93 against Muon's 5.17.)
* ``adago-sm``        the same with Subspace-Momentum (``rank`` and ``proj_gap`` from
  the preset, as the SM entries): each matrix keeps its momentum in the gradient's
  top-r singular subspace (state ``max(m, n) r`` instead of ``m n``)
* ``metastorm``       :class:`snsm.MetaSTORM` (difference version) with the authors'
  deep-learning heuristics: per-coordinate sums and EMAs (beta 0.99), a0 1,
  b0 1e-8, p 1/2. It steps through ``opt.step(closure)``: two gradient
  evaluations per step (the minibatch at the current and at the previous iterate)
* ``metastorm-sn``    the same with Subset-Norm sums (``granularity="subset"``) on
  the linear weights: one accumulator per row/column instead of per coordinate;
  the coordinate-wise group (embeddings, norms) stays per coordinate
* ``muon``            the peer: ``torch.optim.Muon`` (momentum 0.95, Nesterov, the
  ``"original"`` shape factor, weight decay 0) on the same matrices as AdaGO, and
  ``torch.optim.AdamW`` at ``adamw``'s lr on the rest, behind :class:`MuonWithAdamW`
* ``adagrad-norm+adaptive``, ``adagrad-sn+adaptive``: the same optimizers with
  the adaptive batch size (``snsm.AdaptiveBatchSize``, norm test), whatever
  ``--batch-schedule`` says (see :mod:`snsm.bench.train`)

Baselines: ``adamw`` (``torch.optim.AdamW``, the reference line),
``adafactor`` (``torch.optim.Adafactor``), and the peers' own packages when
installed: ``galore`` (``galore-torch``'s ``GaLoreAdamW`` on the attention and
MLP weights, scale 0.25, as in the GaLore paper) and ``adam-mini``
(``adam-mini``'s ``Adam_mini``). A peer that is missing or fails is reported as
skipped with the reason.

Distributed runs (``--parallel``): every entry runs under ``ddp``. Under
``fsdp`` the optimizers step FSDP2's row-sharded DTensors: ours (AdaGO
all-gathers each matrix's update for Newton-Schulz), AdamW, Muon and
Adam-mini do (Muon's Newton-Schulz lets DTensor gather each matrix; checked
against DDP); ``adafactor`` fails on DTensors, and ``galore`` trains but does
not resume exactly from a sharded checkpoint, so those two are refused up
front (``OptimizerSpec.parallel``).
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
from torch import nn

from . import BenchError

log = logging.getLogger(__name__)

BETAS = (0.9, 0.999)
EPS = 1e-8
GALORE_SCALE = 0.25


class PeerUnavailable(Exception):
    """A peer optimizer package is missing or cannot run here; the run reports it as skipped."""


@dataclasses.dataclass(frozen=True)
class BuildContext:
    rank: int
    proj_gap: int
    hidden: int
    heads: int
    seed: int = 0
    aux_lr: float | None = None  # lr of the coordinate-wise group, for entries with ``aux_lr_from``


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    description: str
    build: Callable[[nn.Module, float, BuildContext], torch.optim.Optimizer]
    package: str | None = None  # pip name of a peer package
    aux_lr_from: str | None = None  # entry whose lr the non-matrix group takes (BuildContext.aux_lr)
    batch_schedule: str | None = None  # "adaptive": always runs with the adaptive batch size
    parallel: tuple[str, ...] = ("ddp", "fsdp")  # the --parallel modes it runs under (FSDP: on DTensors)
    # groups stepped at a constant lr (their peak): the LR scheduler drives only the others (train.lr_schedule)
    constant_lr: Callable[[dict], bool] | None = None


def _sm(ctx: BuildContext, proj: str = "svd", **extra: Any) -> dict[str, Any]:
    return {"rank": ctx.rank, "proj": proj, "proj_gap": ctx.proj_gap, "seed": ctx.seed, **extra}


def _adamw(model, lr, ctx):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def _adafactor(model, lr, ctx):
    return torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=0.0)


def _adamw_sn(model, lr, ctx):
    import snsm
    return snsm.AdamWSN(snsm.param_groups(model), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def _adamw_snsm(model, lr, ctx, embeddings=False, **sm):
    import snsm
    return snsm.AdamWSNSM(snsm.param_groups(model, embeddings=embeddings, **_sm(ctx, **sm)),
                          lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def _rmsprop_sn(model, lr, ctx):
    import snsm
    return snsm.RMSpropSN(snsm.param_groups(model), lr=lr, alpha=BETAS[1], eps=EPS, weight_decay=0.0)


def _adagrad_snsm(model, lr, ctx):
    import snsm
    return snsm.AdaGradSNSM(snsm.param_groups(model, **_sm(ctx)), lr=lr, momentum=BETAS[0], eps=EPS,
                            weight_decay=0.0)


def _sgd_sm(model, lr, ctx):
    import snsm
    return snsm.SGDSM(snsm.param_groups(model, **_sm(ctx)), lr=lr, momentum=BETAS[0], weight_decay=0.0)


ADAGRAD_MOMENTUM = BETAS[0]
MUON_MOMENTUM = 0.95  # torch.optim.Muon's default; AdaGO's too


def _aux_lr(ctx: BuildContext, lr: float) -> float:
    return ctx.aux_lr if ctx.aux_lr is not None else lr


def _adagrad_norm(model, lr, ctx):
    import snsm
    matrices, rest = snsm.param_groups(model)
    return snsm.AdaGradNorm([matrices, {**rest, "lr": _aux_lr(ctx, lr)}], lr=lr, momentum=ADAGRAD_MOMENTUM,
                            eps=EPS, weight_decay=0.0)


def _adagrad_sn(model, lr, ctx):
    import snsm
    return snsm.AdaGradSN(snsm.param_groups(model), lr=lr, momentum=ADAGRAD_MOMENTUM, eps=EPS, weight_decay=0.0)


def orthogonalized(group: dict) -> bool:
    """AdaGO's orthogonalized groups (not its coordinate-wise AdamW group)."""
    return group.get("subset_size", "auto") is not None


def _adago(model, lr, ctx, rank: int | None = None):
    import snsm
    sm = {"rank": rank, "proj_gap": ctx.proj_gap} if rank is not None else {}
    opt = snsm.AdaGO(snsm.param_groups(model, **sm), lr=lr, momentum=MUON_MOMENTUM, weight_decay=0.0,
                     adamw_lr=_aux_lr(ctx, 3e-3), adamw_betas=BETAS, adamw_eps=EPS)
    return opt


METASTORM_EMA = 0.99  # the authors' code's beta for --storm_ema


def _metastorm(model, lr, ctx, granularity: str = "coordinate"):
    import snsm
    groups = [{k: v for k, v in g.items() if k != "rank"} for g in snsm.param_groups(model)]
    return snsm.MetaSTORM(groups, lr=lr, granularity=granularity, ema=METASTORM_EMA, weight_decay=0.0)


class _StateView(collections.abc.Mapping):
    """Read-only union of several optimizers' ``state`` (disjoint parameters). Unlike a
    ``ChainMap`` it never indexes a ``defaultdict`` with a key it lacks (that would insert it)."""

    def __init__(self, maps):
        self.maps = maps

    def __getitem__(self, key):
        for m in self.maps:
            if key in m:
                return m[key]
        raise KeyError(key)

    def __iter__(self):
        for m in self.maps:
            yield from m

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the matrices and ``torch.optim.AdamW`` on everything else, as ONE optimizer.

    ``param_groups`` is the Muon groups followed by the AdamW groups (the
    children's own dicts, so an LR scheduler drives both), ``state`` a read-only
    view of both children's states, and ``state_dict()`` a standard flat
    ``{"state", "param_groups"}`` dict (parameters numbered across both, tensors
    and plain values only: it loads with ``torch.load(weights_only=True)``).
    """

    def __init__(self, muon_params, adamw_params, *, lr: float, adamw_lr: float, momentum: float = MUON_MOMENTUM,
                 nesterov: bool = True, weight_decay: float = 0.0, adjust_lr_fn: str | None = None,
                 adamw_betas=BETAS, adamw_eps: float = EPS):
        self.muon = torch.optim.Muon(muon_params, lr=lr, momentum=momentum, nesterov=nesterov,
                                     weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(adamw_params, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                                       weight_decay=weight_decay)
        self.optimizers = (self.muon, self.adamw)
        # What torch.optim.Optimizer.__init__ sets up, minus its own groups and state (the children own those).
        self.defaults = {}
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, collections.OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict]:  # the children replace their group dicts on load_state_dict
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> collections.abc.Mapping:
        return _StateView([o.state for o in self.optimizers])

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("MuonWithAdamW: add groups to .muon or .adamw")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]]})
            state.update({i + offset: s for i, s in sd["state"].items()})
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"MuonWithAdamW: the state dict has {len(groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}")
        start = 0
        for o in self.optimizers:  # the keys pass through: ints here, parameter names from DCP's set_state_dict
            mine = groups[start:start + len(o.param_groups)]
            start += len(o.param_groups)
            keys = [k for g in mine for k in g["params"]]
            o.load_state_dict({"state": {k: state_dict["state"][k] for k in keys if k in state_dict["state"]},
                               "param_groups": mine})


def _muon(model, lr, ctx):
    import snsm
    matrices, rest = snsm.param_groups(model)
    return MuonWithAdamW(matrices["params"], rest["params"], lr=lr, adamw_lr=_aux_lr(ctx, 3e-3))


@contextlib.contextmanager
def _quiet():
    """Silence a peer package's import-time chatter (prints and warnings)."""
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)


def _galore(model, lr, ctx):
    try:
        with _quiet():
            from galore_torch import GaLoreAdamW
    except Exception as e:
        raise PeerUnavailable(f"galore-torch not importable: {type(e).__name__}: {e}") from None
    galore_params, ids = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("attn" in name or "mlp" in name):
            galore_params.append(module.weight)
            ids.add(id(module.weight))
    regular = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": regular},
              {"params": galore_params, "rank": ctx.rank, "update_proj_gap": ctx.proj_gap,
               "scale": GALORE_SCALE, "proj_type": "std"}]
    return GaLoreAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)


def _adam_mini(model, lr, ctx):
    try:
        with _quiet():
            from adam_mini import Adam_mini
    except Exception as e:
        raise PeerUnavailable(f"adam-mini not importable: {type(e).__name__}: {e}") from None
    return Adam_mini(named_parameters=model.named_parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0,
                     dim=ctx.hidden, n_heads=ctx.heads, n_kv_heads=ctx.heads, verbose=False)


REGISTRY: dict[str, OptimizerSpec] = {s.name: s for s in [
    OptimizerSpec("adamw", "torch.optim.AdamW (reference)", _adamw),
    # torch.optim.Adafactor: an in-place op on a DTensor gradient fails under FSDP2
    OptimizerSpec("adafactor", "torch.optim.Adafactor", _adafactor, parallel=("ddp",)),
    # GaLore trains under FSDP2 (its SVD gathers the DTensor), but a DCP resume does not continue it
    # exactly (measured: the wide matrices' low-rank steps differ after loading), so: DDP only
    OptimizerSpec("galore", "GaLore AdamW (galore-torch), scale 0.25", _galore, package="galore-torch",
                  parallel=("ddp",)),
    OptimizerSpec("adam-mini", "Adam-mini (adam-mini)", _adam_mini, package="adam-mini"),
    OptimizerSpec("adamw-sn", "snsm.AdamWSN", _adamw_sn),
    OptimizerSpec("adamw-snsm", "snsm.AdamWSNSM, SVD projector", _adamw_snsm),
    OptimizerSpec("adamw-snsm-emb", "snsm.AdamWSNSM, embeddings under SN/SM too",
                  lambda m, lr, ctx: _adamw_snsm(m, lr, ctx, embeddings=True)),
    OptimizerSpec("adamw-snsm-sync", "snsm.AdamWSNSM, SVD projector, synchronized refreshes",
                  lambda m, lr, ctx: _adamw_snsm(m, lr, ctx, stagger=False)),
    OptimizerSpec("adamw-snsm-randomized", "snsm.AdamWSNSM, randomized projector",
                  lambda m, lr, ctx: _adamw_snsm(m, lr, ctx, proj="randomized")),
    OptimizerSpec("adamw-snsm-srht", "snsm.AdamWSNSM, SRHT projector",
                  lambda m, lr, ctx: _adamw_snsm(m, lr, ctx, proj="srht")),
    OptimizerSpec("rmsprop-sn", "snsm.RMSpropSN", _rmsprop_sn),
    OptimizerSpec("adagrad-snsm", "snsm.AdaGradSNSM, SVD projector", _adagrad_snsm),
    OptimizerSpec("sgd-sm", "snsm.SGDSM, SVD projector", _sgd_sm),
    OptimizerSpec("adagrad-norm", "snsm.AdaGradNorm, momentum 0.9", _adagrad_norm, aux_lr_from="adagrad-sn"),
    OptimizerSpec("adagrad-sn", "snsm.AdaGradSN, momentum 0.9", _adagrad_sn),
    # snsm.AdaGO mixes plain tensors and DTensors in its update under FSDP2 (fails on the first step)
    OptimizerSpec("adago", "snsm.AdaGO, constant eta (AdamW on the rest)", _adago, aux_lr_from="adamw",
                  constant_lr=orthogonalized),
    OptimizerSpec("adago-sm", "snsm.AdaGO with rank-r subspace momentum, constant eta (AdamW on the rest)",
                  lambda m, lr, ctx: _adago(m, lr, ctx, rank=ctx.rank), aux_lr_from="adamw", parallel=("ddp",),
                  constant_lr=orthogonalized),
    OptimizerSpec("muon", "torch.optim.Muon + torch.optim.AdamW on the rest", _muon, aux_lr_from="adamw"),
    # step(closure): two gradients per step, at the current and the previous iterate; not inside backward
    OptimizerSpec("metastorm", "snsm.MetaSTORM, per-coordinate, EMA 0.99", _metastorm, parallel=("ddp",)),
    OptimizerSpec("metastorm-sn", "snsm.MetaSTORM, Subset-Norm sums on linear weights, EMA 0.99",
                  lambda m, lr, ctx: _metastorm(m, lr, ctx, granularity="subset"), parallel=("ddp",)),
    OptimizerSpec("adagrad-norm+adaptive", "snsm.AdaGradNorm, adaptive batch size", _adagrad_norm,
                  aux_lr_from="adagrad-sn", batch_schedule="adaptive"),
    OptimizerSpec("adagrad-sn+adaptive", "snsm.AdaGradSN, adaptive batch size", _adagrad_sn,
                  batch_schedule="adaptive"),
]}


def parse_optimizers(text: str | None, default: tuple[str, ...]) -> list[str]:
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise BenchError(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(REGISTRY)}")
    if not names:
        raise BenchError("--optimizers is empty")
    return list(dict.fromkeys(names))


def lr_config() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("configs/lr.json").read_text())


def learning_rate(name: str, table: str = "default") -> float:
    cfg = lr_config()
    entry = cfg.get(table) or cfg["default"]
    try:
        return float(entry["lr"][name])
    except KeyError:
        raise BenchError(f"no learning rate for {name!r} in configs/lr.json[{table!r}]") from None


def parse_lr_overrides(items: list[str], known: Callable[[str], bool], expected: str) -> dict[str, float]:
    """``--lr NAME=LR`` items as ``{NAME: LR}``; ``BenchError`` for a name ``known`` refuses (the message
    asks for ``expected``), a value that is not a number, or one that is not > 0."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not known(name):
            raise BenchError(f"--lr expects NAME=LR with {expected}, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise BenchError(f"--lr {item!r}: {value!r} is not a number") from None
        if not out[name] > 0:
            raise BenchError(f"--lr {item!r}: the learning rate must be > 0")
    return out


def preload(name: str) -> None:
    """Import the package entry ``name`` builds its optimizer from (quietly; a failure is reported
    when the optimizer is built), so that a memory baseline taken afterwards already holds it."""
    package = REGISTRY[name].package
    try:
        with _quiet():
            if package == "galore-torch":
                import galore_torch  # noqa: F401
            elif package == "adam-mini":
                import adam_mini  # noqa: F401
            elif package is None:
                import snsm  # noqa: F401
    except Exception:  # reported properly when the optimizer is built
        pass


# --- state: counting (its serialisation for checkpoints: snsm.bench.checkpoint) -------------------

def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):  # a DTensor counts its local shard: what this process holds
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    ortho = getattr(obj, "ortho_matrix", None)  # GaLore's projector object keeps its basis here
    if ortho is not None:
        return _tensor_bytes(ortho)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (projector bases included),
    as held by this process (under FSDP: its shards, and the replicated tensors in full)."""
    return sum(_tensor_bytes(s) for s in opt.state.values())
