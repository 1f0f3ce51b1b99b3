r"""AdAdaGrad: adaptive batch sizes from gradient-noise tests, for any training loop.

From "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods"
(Lau, Liu & Kolar, arXiv 2402.11215). With per-sample gradients ``g_i`` and
the batch gradient ``g_B`` (their mean over a batch of size ``B``):

**Norm test** (Byrd et al.): the batch is large enough when
``E||g_B - grad f||^2 <= eta^2 ||grad f||^2``; the next batch size is

.. math::

    B' = \max\Bigl(B,\ \Bigl\lceil \frac{\sum_{\text{coords}} \widehat{\mathrm{Var}}_i(g_i)}
                                     {\eta^2 \lVert g_B \rVert^2} \Bigr\rceil\Bigr)

**Inner-product test** (Bollapragada et al.):

.. math::

    B' = \max\Bigl(B,\ \Bigl\lceil \frac{\widehat{\mathrm{Var}}_i(\langle g_i, g_B \rangle)}
                                     {\theta^2 \lVert g_B \rVert^4} \Bigr\rceil\Bigr)

Both never shrink the batch and are capped at ``max_batch_size``; the result
is rounded up to a multiple of ``granularity`` (the micro-batch size, so the
loop grows its number of gradient-accumulation steps). ``eta`` around
0.1-0.5 (smaller: larger batches); ``theta`` likewise.

Where the variances come from, and what they cost:

* :meth:`AdaptiveBatchSize.observe` after each micro-batch's ``backward()``
  during gradient accumulation (no per-sample gradients; practical for LLMs).
  A micro-batch of ``b`` samples has gradient ``h_j`` with per-coordinate
  variance ``Var(g_i) / b``, so ``b * sample-var_j(h_j)`` estimates the
  per-sample variance (unbiased, ``k - 1`` degrees of freedom for ``k``
  micro-batches: a step needs ``k >= 2``, and few micro-batches give a noisy
  estimate). The controller recovers ``h_j`` (up to the loss's common scale,
  which cancels) as the difference of the accumulated ``.grad`` from the
  previous call. Cost of the norm test: one float32 copy of the gradients,
  two passes over them per micro-batch, one scalar of statistics. The
  inner-product test needs ``<h_j, g_B>`` with the *final* ``g_B``, so it
  keeps every micro-batch gradient until :meth:`update`: ``k`` float32
  copies; prefer the norm test for large models.
* :meth:`AdaptiveBatchSize.observe_samples` with per-sample gradients
  (``(N, *shape)`` per parameter, e.g. from :func:`per_sample_grads`, which
  uses ``torch.func.vmap(grad(...))``): exact sample variances, at ``N``
  times the gradient memory: for small models.

Every micro-batch of one step must have the same number of samples (the loss
of each micro-batch must be its samples' mean times a factor common to the
step, e.g. ``1 / k``, as usual for gradient accumulation).

Typical loop::

    ctl = snsm.AdaptiveBatchSize(batch_size=64, max_batch_size=1024, granularity=16)
    for step in range(steps):
        k = ctl.batch_size // 16
        for j in range(k):
            (loss_fn(model(x[j]), y[j]) / k).backward()
            ctl.observe(model, samples=16)
        opt.step(); opt.zero_grad()
        ctl.update()   # the next step's batch size
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["AdaptiveBatchSize", "per_sample_grads", "TESTS"]

logger = logging.getLogger(__name__)

TESTS = ("norm", "inner_product")

Params = Union[nn.Module, Iterable[torch.Tensor]]


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an int >= {low})")
    return value


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"Invalid {name}: {value!r} (allowed range (0, inf))")
    return float(value)


def _params(params: Params) -> List[torch.Tensor]:
    if isinstance(params, nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


class AdaptiveBatchSize:
    """Adaptive batch-size controller (AdAdaGrad's norm or inner-product test).

    Args:
        batch_size: the starting batch size (samples), ``>= 1``.
        max_batch_size: the cap, ``>= batch_size``.
        test: ``"norm"`` or ``"inner_product"``.
        eta: the norm test's tolerance, ``(0, inf)``.
        theta: the inner-product test's tolerance, ``(0, inf)``.
        granularity: sizes are rounded up to a multiple of this (the
            micro-batch size); ``batch_size`` and ``max_batch_size`` must be
            multiples of it.

    See :mod:`snsm.batch_size` for the estimates and their costs.
    """

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        *,
        test: str = "norm",
        eta: float = 0.25,
        theta: float = 0.25,
        granularity: int = 1,
    ):
        _int("batch_size", batch_size, 1)
        _int("max_batch_size", max_batch_size, batch_size)
        _int("granularity", granularity, 1)
        if test not in TESTS:
            raise ValueError(f"Invalid test: {test!r} (allowed: {', '.join(TESTS)})")
        self.eta = _positive("eta", eta)
        self.theta = _positive("theta", theta)
        if batch_size % granularity or max_batch_size % granularity:
            raise ValueError(
                f"Invalid granularity: {granularity}: batch_size {batch_size} and max_batch_size "
                f"{max_batch_size} must be multiples of it"
            )
        self.test = test
        self.granularity = granularity
        self.max_batch_size = max_batch_size
        self._batch_size = batch_size
        self.steps = 0
        self.last_statistic: Optional[float] = None
        self.history: List[int] = [batch_size]
        self._warned_nonfinite = False
        self.reset()

    # ------------------------------------------------------------------ observation
    @property
    def batch_size(self) -> int:
        """The batch size (samples) to use for the next optimizer step."""
        return self._batch_size

    def reset(self) -> None:
        """Drop what was observed since the last :meth:`update`."""
        self._prev: Optional[List[torch.Tensor]] = None
        self._count = 0  # micro-batches (or samples, per-sample mode)
        self._samples = 0  # samples per observation
        self._sq = 0.0  # sum_j ||d_j||^2
        self._parts: List[torch.Tensor] = []  # inner-product test: flattened d_j
        self._mean: Optional[torch.Tensor] = None  # per-sample mode: flattened mean gradient
        self._var_sum: Optional[float] = None  # per-sample mode: sum of coordinate variances
        self._ip_var: Optional[float] = None  # per-sample mode: Var_i(<g_i, g_B>)

    @torch.no_grad()
    def observe(self, params: Params, samples: int) -> None:
        """Record one micro-batch: call right after its ``backward()`` (``.grad`` accumulating).

        ``samples``: the micro-batch's number of samples, the same for every
        micro-batch of the step.
        """
        _int("samples", samples, 1)
        if self._mean is not None:
            raise ValueError("observe() after observe_samples() in the same step; call update() or reset() first")
        if self._count and samples != self._samples:
            raise ValueError(f"Invalid samples: {samples} (this step's micro-batches had {self._samples} each)")
        ps = _params(params)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float() for p in ps]
        if self._prev is None:
            self._prev = [torch.zeros_like(g) for g in grads]
        elif len(self._prev) != len(grads) or any(a.shape != b.shape for a, b in zip(self._prev, grads)):
            raise ValueError("observe() got different parameters than earlier in this step")
        sq = 0.0
        parts = []
        for prev, g in zip(self._prev, grads):
            d = g - prev
            sq += float(d.square().sum())
            if self.test == "inner_product":
                parts.append(d.flatten())
            prev.copy_(g)
        if self.test == "inner_product":
            self._parts.append(torch.cat(parts) if parts else torch.zeros(0))
        self._sq += sq
        self._count += 1
        self._samples = samples

    @torch.no_grad()
    def observe_samples(self, grads: Sequence[torch.Tensor]) -> None:
        """Record a whole step from per-sample gradients: one ``(N, *shape)`` tensor per parameter."""
        if self._count:
            raise ValueError("observe_samples() after observe() in the same step; call update() or reset() first")
        if not grads:
            raise ValueError("observe_samples() needs at least one per-sample gradient tensor")
        n = grads[0].shape[0]
        if any(g.ndim < 1 or g.shape[0] != n for g in grads):
            raise ValueError("per-sample gradients must share their leading (sample) dimension")
        flat = torch.cat([g.detach().float().reshape(n, -1) for g in grads], dim=1)
        mean = flat.mean(0)
        self._mean = mean
        self._count = n
        self._samples = 1
        if n >= 2:
            self._var_sum = float(flat.var(0, unbiased=True).sum())
            self._ip_var = float((flat @ mean).var(unbiased=True))

    # ------------------------------------------------------------------ the tests
    def _moments(self):
        """(sum of per-sample coordinate variances, Var_i(<g_i, g_B>), ||g_B||^2) up to a common scale."""
        k, b = self._count, self._samples
        if self._mean is not None:
            return self._var_sum, self._ip_var, float(self._mean.square().sum())
        total = [p / k for p in self._prev]  # d_bar, the mean micro-batch contribution
        norm_sq = sum(float(t.square().sum()) for t in total)
        var_sum = b * (self._sq - k * norm_sq) / (k - 1)
        ip_var = None
        if self.test == "inner_product":
            mean = torch.cat([t.flatten() for t in total]) if total else torch.zeros(0)
            ips = torch.stack([part @ mean for part in self._parts])
            ip_var = b * float(ips.var(unbiased=True))
        return max(var_sum, 0.0), ip_var, norm_sq

    def statistic(self) -> Optional[float]:
        """The test's suggested batch size (before rounding, never-shrink and the cap).

        ``None`` when this step cannot be estimated (fewer than 2 micro-batches
        or samples, or a non-finite gradient among them: warned once); ``inf``
        when the batch gradient is zero.
        """
        if self._count < 2:
            return None
        var_sum, ip_var, norm_sq = self._moments()
        moments = (var_sum, norm_sq) if self.test == "norm" else (ip_var, norm_sq)
        if not all(math.isfinite(x) for x in moments):  # a non-finite gradient: nothing to estimate from
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn("AdaptiveBatchSize: a non-finite gradient was observed; the batch size is kept "
                              "for that step (later steps are estimated as usual)", RuntimeWarning, stacklevel=3)
            return None
        if norm_sq == 0.0:
            return math.inf
        if self.test == "norm":
            return var_sum / (self.eta**2 * norm_sq)
        return ip_var / (self.theta**2 * norm_sq**2)

    def suggest(self) -> int:
        """The next batch size from what was observed (does not apply it)."""
        stat = self.statistic()
        if stat is None:
            return self._batch_size
        want = self.max_batch_size if math.isinf(stat) else math.ceil(stat - 1e-9)
        want = -(-want // self.granularity) * self.granularity
        return min(self.max_batch_size, max(self._batch_size, want))

    def update(self) -> int:
        """Apply :meth:`suggest`, clear the observations, and return the new batch size."""
        if self._count < 2 and self._count:
            logger.warning("AdaptiveBatchSize: %d observation(s) this step; need 2 to estimate a variance",
                           self._count)
        self.last_statistic = self.statistic()
        self._batch_size = self.suggest()
        self.history.append(self._batch_size)
        self.steps += 1
        self.reset()
        return self._batch_size

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain numbers only (loads with ``torch.load(weights_only=True)``).

        Saved between steps: observations of a step in progress are not kept.
        """
        return {"batch_size": self._batch_size, "max_batch_size": self.max_batch_size, "test": self.test,
                "eta": self.eta, "theta": self.theta, "granularity": self.granularity, "steps": self.steps,
                "last_statistic": self.last_statistic, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "max_batch_size", "test", "eta", "theta", "granularity", "steps"):
            if key not in state:
                raise ValueError(f"AdaptiveBatchSize state is missing {key!r}")
        fresh = AdaptiveBatchSize(state["batch_size"], state["max_batch_size"], test=state["test"], eta=state["eta"],
                                  theta=state["theta"], granularity=state["granularity"])
        self.__dict__.update(fresh.__dict__)
        self.steps = int(state["steps"])
        self.last_statistic = state.get("last_statistic")
        self.history = list(state.get("history", [self._batch_size]))


def per_sample_grads(model: nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                     targets: torch.Tensor) -> List[torch.Tensor]:
    """Per-sample gradients of ``loss_fn(model(x_i), y_i)`` via ``torch.func.vmap(grad(...))``.

    Returns one ``(N, *p.shape)`` tensor per trainable parameter, in
    ``model.parameters()`` order; memory is ``N`` times the model's gradients.
    ``loss_fn`` receives a batch of one sample (outputs ``(1, ...)``).
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(ps, x, y):
        out = functional_call(model, (ps, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    return [g[n] for n in names]
