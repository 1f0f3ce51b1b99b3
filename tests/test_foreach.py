"""The multi-tensor (foreach) path against the for-loop reference path."""
import pytest
import torch
from torch import nn

import snsm
from conftest import SM_CLASSES, SN_CLASSES

SN_ONLY = [n for n in SN_CLASSES if n not in SM_CLASSES]


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.ModuleDict(dict(
        tall=nn.Linear(12, 40), wide=nn.Linear(40, 9), conv=nn.Conv2d(3, 8, 3), norm=nn.LayerNorm(9),
    )).to(dtype)


def run(name, path, subset_size="auto", lr=1e-2, dtype=torch.float32, steps=5, **options):
    m = model(dtype)
    opt = getattr(snsm, name)([{"params": list(m.parameters()), "subset_size": subset_size}], lr=lr,
                              weight_decay=0.1, **path, **options)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return m, opt


FOREACH = dict(foreach=True)
REFERENCE = dict(fused=False, foreach=False)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (ma, oa), (mb, ob) = a, b
    for (key, x), y in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=key)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert sa[i][k].dtype == sb[i][k].dtype and sa[i][k].shape == sb[i][k].shape
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", SN_ONLY)
@pytest.mark.parametrize("subset_size", ["auto", 16, -2, None])
def test_foreach_matches_reference(name, subset_size):
    assert_same(run(name, FOREACH, subset_size), run(name, REFERENCE, subset_size))


def test_foreach_without_second_moment():  # SGD with momentum (SGDSM with rank=None)
    for momentum in (0.9, 0.0):
        assert_same(run("SGDSM", FOREACH, None, rank=None, momentum=momentum),
                    run("SGDSM", REFERENCE, None, rank=None, momentum=momentum))


def test_foreach_with_a_tensor_lr_and_float64():
    assert_same(run("AdamWSN", FOREACH, lr=torch.tensor(0.01)), run("AdamWSN", REFERENCE))
    assert_same(run("AdaGradSN", FOREACH, dtype=torch.float64), run("AdaGradSN", REFERENCE, dtype=torch.float64))


def test_foreach_hands_subspace_and_low_precision_to_the_reference_path():
    sm = dict(rank=3, proj_gap=3)
    assert_same(run("AdamWSNSM", FOREACH, **sm), run("AdamWSNSM", REFERENCE, **sm))
    assert_same(run("AdamWSN", FOREACH, state_dtype="bfloat16"), run("AdamWSN", REFERENCE, state_dtype="bfloat16"))


def test_foreach_runs_the_group_in_one_call_when_asked(monkeypatch):
    calls = []
    real = snsm.foreach.sn_step_foreach_
    monkeypatch.setattr(snsm.foreach, "sn_step_foreach_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    run("AdamWSN", FOREACH, steps=1)
    assert calls == [8]  # every parameter of the group in one call
    calls.clear()
    run("AdamWSN", dict(fused=False), steps=1)  # foreach=None: on a CPU, as torch.optim, the loop
    assert calls == []


def test_fused_and_foreach_together_is_an_error():
    with pytest.raises(ValueError, match="fused=True with foreach=True"):
        snsm.AdamWSN(model().parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="Invalid foreach"):
        snsm.AdamWSN(model().parameters(), foreach="yes")
