"""AdaGO: orthogonal direction, the step-size formula, Muon equivalence, routing, resume, bad input."""
import io
import math

import pytest
import torch
from torch import nn

import snsm
from snsm import adago
from snsm.adago import newton_schulz


def reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][j], sb[k][j]) for j in sa[k]) for k in sa)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 2, 3, 3)])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_direction_is_orthogonalized(shape, ns_dtype):
    """With a constant unit step the update is -O_t: its singular values are ~1 (quintic NS: ~[0.7, 1.2])."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    opt = snsm.AdaGO([w], lr=1.0, adaptive=False, ns_dtype=ns_dtype)
    for _ in range(3):
        g = torch.randn(shape) * torch.logspace(-1, 0.5, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
        before = w.detach().clone()
        w.grad = g
        opt.step()
        s = torch.linalg.svdvals((before - w.detach()).reshape(shape[0], -1))
        assert s.min() > 0.6 and s.max() < 1.25, s
    raw = torch.linalg.svdvals(g.reshape(shape[0], -1))
    assert raw.max() / raw.min() > 20  # the gradient itself was far from orthogonal
    # (5 quintic steps lift singular values down to about 1e-2 of the Frobenius norm, not below)


def test_newton_schulz_matches_the_polar_factor_direction():
    torch.manual_seed(0)
    x = torch.randn(12, 20)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    o = newton_schulz(x, steps=5, dtype=torch.float32)
    cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cos > 0.98 and o.dtype == torch.float32 and o.shape == x.shape
    assert torch.equal(x, x.clone())  # input untouched
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(3))


def test_step_size_follows_the_formula():
    """alpha_t = max(eps, eta min(||G_t||, gamma) / v_t), v_t^2 = v_0^2 + sum min(||G||^2, gamma^2); W -= alpha_t O_t."""
    torch.manual_seed(0)
    eta, mu, gamma, eps, v0 = 0.07, 0.8, 2.0, 0.001, 0.5
    w = nn.Parameter(torch.randn(10, 6, dtype=torch.float64))
    opt = snsm.AdaGO([w], lr=eta, momentum=mu, gamma=gamma, eps=eps, v0=v0, ns_dtype="float32")
    scales = [0.1, 3.0, 0.5, 0.05, 1e-4, 0.3]  # 3.0 is clipped by gamma, 1e-4 hits the eps floor
    m, v_sq = torch.zeros(10, 6, dtype=torch.float64), v0**2
    floors = 0
    for s in scales:
        g = torch.randn(10, 6, dtype=torch.float64)
        g = g / g.norm() * s
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        m = m.lerp(g, 1 - mu)
        clipped = min(s**2, gamma**2)
        v_sq += clipped
        raw = eta * math.sqrt(clipped) / math.sqrt(v_sq)
        alpha = max(eps, raw)
        floors += raw < eps
        o = newton_schulz(m, 5, dtype=torch.float32).double()
        assert torch.allclose(before - w.detach(), alpha * o, rtol=0, atol=1e-6 * alpha)
        assert opt.state[w]["v_sq"].item() == pytest.approx(v_sq, rel=1e-6)
    assert floors == 1
    assert opt.state[w]["v_sq"].dtype == torch.float32 and opt.state[w]["v_sq"].numel() == 1


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (16, 16)])
@pytest.mark.parametrize("nesterov, weight_decay, adjust", [(False, 0.0, "original"), (False, 0.0, "match_rms_adamw"),
                                                            (True, 0.1, "original")])
def test_constant_step_equals_torch_muon(shape, nesterov, weight_decay, adjust):
    """adaptive=False + bf16 Newton-Schulz: bit for bit torch.optim.Muon (whose momentum is the same EMA)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(shape))
    b = nn.Parameter(a.detach().clone())
    ours = snsm.AdaGO([a], lr=0.02, momentum=0.9, adaptive=False, ns_dtype="bfloat16", nesterov=nesterov,
                      weight_decay=weight_decay, adjust_lr_fn=adjust)
    muon = torch.optim.Muon([b], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                            adjust_lr_fn=adjust)
    for _ in range(6):
        g = torch.randn(shape)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        muon.step()
        assert torch.equal(a, b)
    assert torch.equal(ours.state[a]["exp_avg"], muon.state[b]["momentum_buffer"])


def test_state_is_momentum_plus_one_scalar():
    w = nn.Parameter(torch.randn(20, 30))
    opt = snsm.AdaGO([w])
    w.grad = torch.randn(20, 30)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "v_sq"}
    assert sum(v.numel() for v in opt.state[w].values()) == w.numel() + 2


def test_param_groups_routes_the_rest_to_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.LayerNorm(8))
    opt = snsm.AdaGO(snsm.param_groups(model), lr=0.05, adamw_lr=0.01, adamw_betas=(0.9, 0.99))
    mat, rest = opt.param_groups
    assert mat["lr"] == 0.05 and rest["lr"] == 0.01
    ref_params = [nn.Parameter(p.detach().clone()) for p in rest["params"]]
    ref = torch.optim.AdamW(ref_params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for p, q in zip(rest["params"], ref_params):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(rest["params"], ref_params))
    assert "v_sq" in opt.state[model[1].weight] and "exp_avg_sq" in opt.state[model[1].bias]


def test_scheduler_drives_both_parts():
    """A scheduler scales both parts; eps is the paper's absolute floor on alpha_t, so lr=0 still moves by eps."""
    for eps in (0.0, 1e-3):
        torch.manual_seed(0)
        model = nn.Linear(6, 4)
        opt = snsm.AdaGO(snsm.param_groups(model), lr=0.05, adamw_lr=0.01, eps=eps, ns_dtype="float32")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.0][min(t, 1)])
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
        w, b = model.weight.detach().clone(), model.bias.detach().clone()
        opt.step()
        assert torch.equal(model.bias, b)
        moved = torch.linalg.svdvals(model.weight.detach() - w)
        if eps == 0.0:
            assert moved.max() == 0.0
        else:
            assert 0.6 * eps < moved.min() and moved.max() < 1.25 * eps


def test_vector_in_a_matrix_group_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(5,\).*subset_size=None"):
        snsm.AdaGO([nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(5))])


@pytest.mark.parametrize("options, error, match", [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(gamma=0.0), ValueError, r"gamma.*\(0.0, inf\]"),
    (dict(eps=-1e-3), ValueError, "eps"),
    (dict(v0=0.0), ValueError, "v0"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(ns_steps=0), ValueError, r"ns_steps.*\[1, 99\]"),
    (dict(ns_coefficients=(1.0, 2.0)), ValueError, "ns_coefficients"),
    (dict(ns_dtype="float16"), ValueError, "ns_dtype.*None, float32, bfloat16"),
    (dict(adjust_lr_fn="sqrt"), ValueError, "adjust_lr_fn"),
    (dict(adamw_betas=(0.9, 1.5)), ValueError, r"adamw_betas\[1\]"),
    (dict(rank=0), ValueError, "rank"),
    (dict(proj_gap=0), ValueError, "proj_gap"),
    (dict(refresh="keep"), ValueError, "refresh"),
    (dict(subset_size=16), ValueError, "subset_size"),
    (dict(nesterov="yes"), TypeError, "nesterov"),
    (dict(lr="fast"), TypeError, "lr"),
])
def test_bad_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        snsm.AdaGO([nn.Parameter(torch.randn(4, 5))], **options)


def test_torch_dtype_options_are_normalised():
    opt = snsm.AdaGO([nn.Parameter(torch.randn(4, 5))], ns_dtype=torch.float32)
    assert opt.param_groups[0]["ns_dtype"] == "float32"


@pytest.mark.parametrize("hardware,option,expected", [
    (True, None, torch.bfloat16), (False, None, torch.float32),  # the default follows the hardware
    (False, "bfloat16", torch.bfloat16), (True, "float32", torch.float32),  # an explicit choice always holds
])
def test_newton_schulz_dtype_defaults_to_bf16_only_where_it_runs_in_hardware(hardware, option, expected, monkeypatch):
    monkeypatch.setattr(adago, "bf16_matmul_in_hardware", lambda device_type: hardware)
    seen = []
    real = adago.newton_schulz
    monkeypatch.setattr(adago, "newton_schulz", lambda x, steps, coeffs, dtype: seen.append(dtype) or real(
        x, steps, coeffs, dtype))
    w = nn.Parameter(torch.randn(6, 4))
    opt = snsm.AdaGO([w], ns_dtype=option)
    w.grad = torch.randn(6, 4)
    opt.step()
    assert seen == [expected]


def test_bf16_hardware_probe_answers_for_this_machine():
    cpu = adago.bf16_matmul_in_hardware("cpu")
    probes = [getattr(torch.cpu, n)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
              if hasattr(torch.cpu, n)]
    assert cpu == any(probes)
    assert adago.bf16_matmul_in_hardware("meta") is False


def test_failing_step_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    params = list(model.parameters())
    opt = snsm.AdaGO(snsm.param_groups(model))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad = params[-1].grad.to_sparse()  # a bias in the AdamW group, stepped last
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert same(before, snapshot(opt, params))
    params[-1].grad = torch.randn_like(params[-1])
    opt.param_groups[0]["gamma"] = -1.0
    with pytest.raises(ValueError, match="gamma"):
        opt.step()
    assert same(before, snapshot(opt, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(dtype):
    def run(split):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 30),
                              nn.LayerNorm(30)).to(dtype)
        make = lambda: snsm.AdaGO(snsm.param_groups(model), lr=0.05, nesterov=True, weight_decay=0.01)  # noqa: E731
        opt = make()
        for t in range(8):
            if t == split:
                sd = reload(opt.state_dict())
                opt = make()
                opt.load_state_dict(sd)
            gen = torch.Generator().manual_seed(100 + t)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    (a, oa), (b, ob) = run(None), run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for p, q in zip(oa.state, ob.state):
        for k in oa.state[p]:
            assert oa.state[p][k].dtype == ob.state[q][k].dtype and torch.equal(oa.state[p][k], ob.state[q][k])
    w = next(p for p in oa.state if "v_sq" in oa.state[p])
    assert oa.state[w]["v_sq"].dtype == torch.float32 and oa.state[w]["exp_avg"].dtype == torch.float32


def test_subspace_momentum_orthogonalizes_the_subspace_numerator():
    """rank=r: N = back(M) + G - back(R) goes into Newton-Schulz, with R = G Q (Q the top-r right
    singular vectors of the gradient at the refresh), M the EMA of R; transcribed for 4 steps with
    refreshes at steps 1, 2 and 4 (the first step, then every proj_gap; M transported into the new basis)."""
    from snsm import subspace as sm

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 6, dtype=torch.float64))
    opt = snsm.AdaGO([w], rank=2, proj_gap=2, ns_dtype="float32", lr=0.1, momentum=0.9)
    grads = [torch.randn(12, 6, dtype=torch.float64) for _ in range(4)]
    x, m, q, v_sq = w.detach().clone(), torch.zeros(12, 2, dtype=torch.float64), None, 1e-2**2
    for t, g in enumerate(grads, start=1):
        if t == 1 or t % 2 == 0:
            new = sm.build_projector("svd", g, 2)
            m = sm.transport(m, q, new, 12) if q is not None else torch.zeros_like(m)
            q = new
        r = g @ q.to(g.dtype)
        m = 0.9 * m + 0.1 * r
        n = g + (m - r) @ q.to(g.dtype).T
        o = newton_schulz(n, dtype=torch.float32).to(torch.float64)
        v_sq += min(float(g.square().sum()), 10.0**2)
        alpha = max(1e-6, 0.1 * min(float(g.norm()), 10.0) / v_sq**0.5)
        x = x - alpha * o
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), x, rtol=1e-5, atol=1e-6)
    state = opt.state[w]
    assert state["exp_avg"].shape == (12, 2) and state["proj"].shape == (6, 2) and int(state["proj_step"]) == 4


def test_a_rank_at_least_the_matrix_rank_is_full_momentum():
    runs = []
    for rank in (None, 6):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(12, 6))
        opt = snsm.AdaGO([w], rank=rank)
        for _ in range(3):
            w.grad = torch.randn(12, 6)
            opt.step()
        runs.append((w.detach().clone(), opt.state[w]["exp_avg"].shape))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == (12, 6)
