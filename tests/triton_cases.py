"""The Triton (CUDA) Subset-Norm kernels, run on CPU tensors through Triton's interpreter.

They must compute the same step as the update's definition for every layout,
and drive the optimizers' fused path to the reference path's trajectory.
Run by ``test_triton.py`` in a fresh process with ``TRITON_INTERPRET=1`` (the
interpreter does not mix with a process where inductor imported Triton).
"""
import importlib.util

import pytest
import torch
from torch import nn

import snsm
from snsm import fused
from snsm._kernels import triton_sn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton not installed (pip install triton; Linux x86_64)")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def definition(p, g, m, v, layout, row_len, beta1, v_decay, v_gain, update_v, eps, step, decay):
    """The step written out in torch: the kernels' contract."""
    num = g
    if m.numel():
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        num = m
    if v.numel():
        sq = g * g
        if layout == 0:
            sums, frame, denom = sq.reshape(-1), (-1,), (-1,)
        else:
            sums = sq.reshape(-1, row_len).sum(1 if layout == 1 else 0)
            frame, denom = (-1, row_len), ((-1, 1) if layout == 1 else (1, -1))
        if update_v:
            v.mul_(v_decay).add_(sums, alpha=v_gain)
        num = (num.reshape(frame) / v.sqrt().add(eps).view(denom)).view(p.shape)
    p.sub_(step * num).mul_(decay)


LAYOUTS = [(0, (37, 13), 1), (1, (37, 13), 13), (1, (5, 2100), 2100), (2, (37, 13), 13)]


@pytest.mark.parametrize("layout,shape,row_len", LAYOUTS)
@pytest.mark.parametrize("has_m", [True, False])
@pytest.mark.parametrize("has_v,update_v", [(True, True), (True, False), (False, False)])
def test_kernel_computes_the_defined_step(layout, shape, row_len, has_m, has_v, update_v):
    torch.manual_seed(0)
    p, g = torch.randn(shape), torch.randn(shape)
    m = torch.randn(shape) if has_m else torch.empty(0)
    v = torch.rand({0: p.numel(), 1: shape[0], 2: shape[1]}[layout]) if has_v else torch.empty(0)
    ours, want = [t.clone() for t in (p, g, m, v)], [t.clone() for t in (p, g, m, v)]
    args = (layout, row_len, 0.9, 0.99, 0.01, update_v, 1e-8, 0.01, 0.999)
    triton_sn.sn_step(*ours, *args)
    definition(*want, *args)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if has_v:  # the accumulator alone
        v_ours, v_want = v.clone(), v.clone()
        triton_sn.sn_accumulate(g, v_ours, layout, row_len, 0.99, 0.01)
        definition(p.clone(), g, torch.empty(0), v_want, layout, row_len, 0.9, 0.99, 0.01, True, 1e-8, 0.01, 0.999)
        torch.testing.assert_close(v_ours, v_want)


@pytest.mark.parametrize("name,options", [
    ("AdamWSN", {}), ("RMSpropSN", {}), ("AdaGradSN", dict(subset_size=16)),
    ("AdamWSNSM", dict(rank=3, proj_gap=3)), ("SGDSM", dict(rank=3, proj_gap=3)),
])
def test_optimizers_on_the_triton_path_match_the_reference(name, options, monkeypatch):
    monkeypatch.setattr(fused, "kernel_for", lambda device: triton_sn)  # as on a CUDA device

    def run(use_fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 7))  # tall and wide
        opt = getattr(snsm, name)(snsm.param_groups(model, **options), lr=1e-2, fused=use_fused, foreach=False)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return model

    for a, b in zip(run(True).parameters(), run(False).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
