"""The optimizers on an accelerator: the fast path (the Triton kernels on CUDA) against the
reference path, checkpoints moving between CUDA and CPU, a compiled step, and no host
synchronisation between projector refreshes.

Skipped where torch sees no CUDA device. ``SNSM_TEST_DEVICE=cpu`` runs the same checks on
CPU (the fast path is then the C++ kernel), which is how their logic is checked on a machine
without a GPU; ``scripts/gpu_check.sh`` runs them on one.
"""
import io
import os

import pytest
import torch
from torch import nn

import snsm
from snsm import fused
from conftest import SM_CLASSES, SN_CLASSES
from triton_cases import LAYOUTS, definition

DEVICE = torch.device(os.environ.get("SNSM_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (SNSM_TEST_DEVICE=cpu runs these checks on CPU)"),
    pytest.mark.skipif(DEVICE.type != "cuda" and fused.kernel_for(DEVICE) is None,
                       reason=f"no fused kernel for {DEVICE}"),
]

SM = dict(rank=4, proj_gap=3)


def kernel():
    k = fused.kernel_for(DEVICE)
    assert k is not None, f"no fused kernel for {DEVICE} (Triton missing?)"
    return k


@pytest.mark.parametrize("layout,shape,row_len", LAYOUTS)
@pytest.mark.parametrize("has_m,has_v,update_v", [(True, True, True), (False, True, False), (True, False, False)])
def test_kernel_on_the_device_computes_the_defined_step(layout, shape, row_len, has_m, has_v, update_v):
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen) if has_m else torch.empty(0)
    v = torch.rand({0: p.numel(), 1: shape[0], 2: shape[1]}[layout], generator=gen) if has_v else torch.empty(0)
    args = (layout, row_len, 0.9, 0.99, 0.01, update_v, 1e-8, 0.01, 0.999)
    ours = [t.to(DEVICE) for t in (p, g, m, v)]
    kernel().sn_step(*ours, *args)
    definition(p, g, m, v, *args)  # on CPU, in place
    for a, b in zip(ours, (p, g, m, v)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


def model(device):
    torch.manual_seed(0)
    # an embedding, tall and wide matrices (the wide one larger than one kernel block), a norm scale
    return nn.ModuleDict(dict(
        emb=nn.Embedding(50, 24), tall=nn.Linear(24, 300), wide=nn.Linear(300, 40), norm=nn.LayerNorm(40),
    )).to(device)


def grads(m, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def make(name, m, options=None, **kw):
    options = dict(SM if name in SM_CLASSES else {}, **(options or {}))
    return getattr(snsm, name)(snsm.param_groups(m, **options), lr=1e-2, weight_decay=0.1, **kw)


def train(opt, m, steps, start=0):
    for t in range(start, start + steps):
        grads(m, t)
        opt.step()


CASES = [(n, {}) for n in SN_CLASSES] + [
    ("AdamWSN", dict(subset_size=16)),
    ("AdamWSNSM", dict(proj="randomized")),
    ("AdamWSNSM", dict(proj="srht")),
    ("AdamWSNSM", dict(proj="topk")),
    ("AdamWSNSM", dict(refresh="reset")),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                     for n, o in CASES])
def test_default_path_on_the_device_matches_the_cpu_reference(name, options):
    on_device, on_cpu = model(DEVICE), model("cpu")
    fast = make(name, on_device, options)
    ref = make(name, on_cpu, options, fused=False, foreach=False)
    train(fast, on_device, 7)
    train(ref, on_cpu, 7)
    for (key, a), b in zip(on_device.named_parameters(), on_cpu.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5, msg=key)
    sf, sr = fast.state_dict()["state"], ref.state_dict()["state"]
    assert sf.keys() == sr.keys()
    for i in sf:
        assert sf[i].keys() == sr[i].keys(), i
        for k in sf[i]:
            assert sf[i][k].shape == sr[i][k].shape and sf[i][k].dtype == sr[i][k].dtype, (i, k)


def test_fused_true_takes_the_device_kernel(monkeypatch):
    m = model(DEVICE)
    opt = make("AdamWSN", m, fused=True)
    calls = []
    k = kernel()
    real = k.sn_step

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(k, "sn_step", spy)
    if hasattr(k, "fused_step"):  # the C++ kernel takes the whole step in one call
        real_all = k.fused_step
        monkeypatch.setattr(k, "fused_step", lambda *a: calls.append("fused_step") or real_all(*a))
    train(opt, m, 2)
    assert calls


def test_checkpoint_moves_between_the_device_and_cpu():
    """State saved on the device loads into a CPU optimizer (and back) and continues the same trajectory."""
    m = model(DEVICE)
    opt = make("AdamWSNSM", m)
    train(opt, m, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location="cpu")
    on_cpu = model("cpu")
    with torch.no_grad():
        for p, q in zip(on_cpu.parameters(), m.parameters()):
            p.copy_(q.cpu())
    cpu_opt = make("AdamWSNSM", on_cpu, fused=False, foreach=False)
    cpu_opt.load_state_dict(sd)
    back = make("AdamWSNSM", model(DEVICE))
    back.load_state_dict(cpu_opt.state_dict())  # CPU state into a device optimizer: moved to the parameters
    assert all(t.device == p.device for p, st in back.state.items() for k, t in st.items()
               if torch.is_tensor(t) and k != "step")
    train(opt, m, 4, start=4)
    train(cpu_opt, on_cpu, 4, start=4)
    for p, q in zip(m.parameters(), on_cpu.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-5)


def test_bf16_state_with_stochastic_rounding_on_the_device():
    m16, m32 = model(DEVICE), model(DEVICE)
    o16 = make("AdamWSNSM", m16, dict(state_dtype="bfloat16"))
    o32 = make("AdamWSNSM", m32)
    train(o16, m16, 10)
    train(o32, m32, 10)
    compressed = o16.param_groups[0]["params"]  # the group that takes the option
    assert {o16.state[p]["exp_avg"].dtype for p in compressed} == {torch.bfloat16}
    start = model(DEVICE)
    for (key, a), b, a0 in zip(m16.named_parameters(), m32.parameters(), start.parameters()):
        # drift from float32 state: about 1e-3 of the distance travelled here; other groups keep float32
        assert (a - b).norm() <= 0.01 * (b - a0).norm(), key


@pytest.mark.parametrize("name", ["AdamWSN", "AdamWSNSM"])
def test_compiled_step_on_the_device_matches_eager_without_recompiling(name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    me, mc = model(DEVICE), model(DEVICE)
    eager = getattr(snsm, name)(snsm.param_groups(me, **(SM if name in SM_CLASSES else {})), lr=torch.tensor(0.01),
                                fused=False, foreach=False)
    compiled = getattr(snsm, name)(snsm.param_groups(mc, **(SM if name in SM_CLASSES else {})), lr=torch.tensor(0.01))
    counter = CompileCounter()
    step = torch.compile(compiled.step, backend=counter, fullgraph=True)
    for t in range(5):
        for opt in (eager, compiled):
            for group in opt.param_groups:
                group["lr"].fill_(0.01 * (1 + t))
        grads(me, t)
        grads(mc, t)
        eager.step()
        step()
    assert counter.frame_count <= 2  # state creation, then one graph for every later step
    for a, b in zip(me.parameters(), mc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("name", ["AdamWSN", "AdamWSNSM", "SGDSM"])
def test_steps_between_refreshes_do_not_synchronise_with_the_host(name):
    m = model(DEVICE)
    opt = make(name, m, dict(proj_gap=50, stagger=False) if name in SM_CLASSES else None)
    train(opt, m, 2)  # state creation and the first bases
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(2, 6):
            for p in m.parameters():
                p.grad.mul_(0.5)  # new gradients without a host-to-device copy
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in m.parameters())
