"""State: tensors only, weights_only round trip, bit-exact resume, documented memory."""
import io

import pytest
import torch
from torch import nn

import snsm
from conftest import PROJECTIONS, SM_CLASSES, SN_CLASSES

CONFIGS = [(n, p) for n in SN_CLASSES for p in (PROJECTIONS if n in SM_CLASSES else [None])]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 40), nn.LayerNorm(40))


def build(name, model, proj):
    opts = dict(rank=4, proj_gap=3, proj=proj) if proj else {}
    return getattr(snsm, name)(snsm.param_groups(model, **opts), lr=1e-2)


def feed(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(name, proj, split=None, steps=8):
    model = small_model()
    opt = build(name, model, proj)
    for t in range(steps):
        if t == split:
            sd = reload(opt.state_dict())
            opt = build(name, model, proj)
            opt.load_state_dict(sd)
        feed(model, t)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("name, proj", CONFIGS, ids=[f"{n}-{p}" if p else n for n, p in CONFIGS])
def test_resume_is_bit_exact(name, proj):
    """8 steps == 4 steps + save + load(weights_only) into a fresh optimizer + 4 steps (crosses 2 refreshes)."""
    straight, opt_a = run(name, proj)
    resumed, opt_b = run(name, proj, split=4)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert sa[i][k].dtype == sb[i][k].dtype and torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("name, proj", CONFIGS, ids=[f"{n}-{p}" if p else n for n, p in CONFIGS])
def test_state_holds_only_tensors(name, proj):
    _, opt = run(name, proj, steps=2)
    for state in opt.state.values():
        assert all(torch.is_tensor(v) for v in state.values())
    for group in opt.state_dict()["param_groups"]:
        for k, v in group.items():
            assert v is None or isinstance(v, (int, float, str, bool, list, tuple)), (k, type(v))


def test_a_checkpoint_from_before_newer_options_loads_with_their_defaults():
    model = small_model()
    opt = build("AdamWSNSM", model, "svd")
    feed(model, 0)
    opt.step()
    sd = reload(opt.state_dict())
    for group in sd["param_groups"]:  # written before these options existed
        del group["foreach"], group["stochastic_rounding"]
    resumed_model = small_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = build("AdamWSNSM", resumed_model, "svd")
    resumed.load_state_dict(sd)
    assert all(g["foreach"] is None and g["stochastic_rounding"] is True for g in resumed.param_groups)
    for m, o in ((model, opt), (resumed_model, resumed)):
        feed(m, 1)
        o.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_loaded_state_keeps_dtypes():
    """torch casts loaded state to the parameter dtype; we must not (bf16 params, int64 indices)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8).bfloat16())
    opt = snsm.AdamWSNSM([w], rank=2, proj="topk")
    w.grad = torch.randn(16, 8).bfloat16()
    opt.step()
    fresh = snsm.AdamWSNSM([w], rank=2, proj="topk")
    fresh.load_state_dict(reload(opt.state_dict()))
    st = fresh.state[w]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert st["proj"].dtype == torch.int64 and torch.equal(st["proj"], opt.state[w]["proj"])


# ------------------------------------------------------------------ memory
H, I, L, V = 512, 1376, 8, 32000  # LLaMA-60M shapes, untied head


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(H, H, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down = nn.Linear(I, H, bias=False)
        self.n1, self.n2 = nn.RMSNorm(H), nn.RMSNorm(H)


class Llama60M(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.norm = nn.RMSNorm(H)
        self.head = nn.Linear(H, V, bias=False)


def snsm_elements(m, n, r):
    """The documented formula: AdamW-SNSM on an m x n weight, dense projector of rank r.

    momentum max(m, n) * r + basis min(m, n) * r + Subset-Norm max(m, n)."""
    return max(m, n) * r + min(m, n) * r + max(m, n)


def expected_ratio(model, r, embeddings):
    adamw = 2 * sum(p.numel() for p in model.parameters())
    total = 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "weight" and (isinstance(mod, nn.Linear) or (embeddings and isinstance(mod, nn.Embedding))):
                total += snsm_elements(*p.shape, r)
            else:
                total += 2 * p.numel()
    return total / adamw


@pytest.mark.parametrize("embeddings, bound", [(False, 0.42), (True, 0.17)])
def test_llama60m_state_memory(embeddings, bound):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one step of 57 SVDs: ~4 s alone, but oversubscribed threads spin for minutes
    model = Llama60M()
    opt = snsm.AdamWSNSM(snsm.param_groups(model, rank=128, embeddings=embeddings), lr=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    try:
        opt.step()
    finally:
        torch.set_num_threads(threads)
    adamw = 2 * sum(p.numel() for p in model.parameters())
    held = sum(v.numel() for s in opt.state.values() for k, v in s.items() if v.numel() > 1)
    ratio = held / adamw
    assert ratio == pytest.approx(expected_ratio(model, 128, embeddings), abs=1e-9)
    assert ratio <= bound
    assert ratio == pytest.approx(0.41 if not embeddings else 0.16, abs=0.01)
