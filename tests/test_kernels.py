"""The fused fast path against the reference (for-loop) path: same trajectory, same state."""
import io
import types

import pytest
import torch
from torch import nn

import snsm
from snsm import fused
from snsm._kernels import cpu_kernel, unavailable_reason
from conftest import PROJECTIONS, SM_CLASSES, SN_CLASSES

pytestmark = pytest.mark.skipif(cpu_kernel() is None, reason=f"fused CPU kernel unavailable: {unavailable_reason()}")


def model():
    torch.manual_seed(0)
    # tall, wide, square, conv-like and vector parameters
    return nn.ModuleDict(dict(
        tall=nn.Linear(12, 40), wide=nn.Linear(40, 9), sq=nn.Linear(16, 16, bias=False),
        conv=nn.Conv2d(3, 8, 3), norm=nn.LayerNorm(9),
    ))


def groups(m, subset_size, sm_opts):
    mats = [m["tall"].weight, m["wide"].weight, m["sq"].weight, m["conv"].weight]
    rest = [p for p in m.parameters() if all(p is not q for q in mats)]
    g = {"params": mats, **sm_opts}
    if subset_size != "default":
        g["subset_size"] = subset_size
    return [g, {"params": rest, "subset_size": None, "rank": None}]


def run(name, use_fused, subset_size="auto", proj="svd", steps=7, weight_decay=0.1):
    m = model()
    sm_opts = dict(rank=3, proj=proj, proj_gap=3) if name in SM_CLASSES else {}
    if name == "SGDSM":
        subset_size = None
    opt = getattr(snsm, name)(groups(m, subset_size, sm_opts), lr=1e-2, weight_decay=weight_decay, fused=use_fused,
                                       foreach=False)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return m, opt


CASES = [(n, s, p) for n in SN_CLASSES for s in ("auto", 16, None)
         for p in (PROJECTIONS if n in SM_CLASSES else [None]) if not (n == "SGDSM" and s != "auto")]


@pytest.mark.parametrize("name, subset_size, proj", CASES, ids=[f"{n}-{s}-{p}" for n, s, p in CASES])
def test_fused_matches_reference(name, subset_size, proj):
    mf, of = run(name, True, subset_size, proj)
    mr, orf = run(name, False, subset_size, proj)
    for (key, a), b in zip(mf.named_parameters(), mr.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key
    sf, sr = of.state_dict()["state"], orf.state_dict()["state"]
    assert sf.keys() == sr.keys()
    for i in sf:
        assert sf[i].keys() == sr[i].keys()
        for k in sf[i]:
            assert sf[i][k].shape == sr[i][k].shape and sf[i][k].dtype == sr[i][k].dtype
            assert torch.allclose(sf[i][k].float(), sr[i][k].float(), rtol=1e-4, atol=1e-6), (i, k)


def continue_training(opt, m, seed, steps=3):
    """``steps`` more steps of ``opt`` on gradients drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_checkpoint_moves_between_paths():
    """State saved by the fused path continues on the reference path, and the other way round."""
    for first, second in ((True, False), (False, True)):
        m, opt = run("AdamWSNSM", first, steps=4)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        ref_m, ref_opt = run("AdamWSNSM", second, steps=4)
        ref_opt.load_state_dict(sd)
        with torch.no_grad():
            for p, q in zip(ref_m.parameters(), m.parameters()):
                p.copy_(q)
        for o, mm in ((opt, m), (ref_opt, ref_m)):
            continue_training(o, mm, seed=99)
        for p, q in zip(m.parameters(), ref_m.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_fused_true_on_an_unsupported_parameter_is_a_clear_error():
    p = nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = snsm.AdamWSN([p], fused=True)
    p.grad = torch.randn(8, 4).bfloat16()
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    assert not opt.state[p]  # nothing happened
    with pytest.raises(ValueError, match="fused"):
        snsm.AdamWSN([p], fused="yes")


def test_default_path_is_the_fused_one_where_it_applies():
    p = nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    assert fused.supports(p, torch.float32)
    assert not fused.supports(p.detach().bfloat16().requires_grad_(), torch.float32)


def refresh_steps(opt, m, steps):
    seen = {id(p): [] for p in m.parameters()}
    for _ in range(steps):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for p in m.parameters():
            st = opt.state[p]
            if "proj_step" in st and int(st["proj_step"]) == int(st["step"]):
                seen[id(p)].append(int(st["step"]))
    return [v for v in seen.values() if v]


def test_staggered_refreshes_spread_over_the_gap():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(6)])
    opt = snsm.AdamWSNSM(m.parameters(), rank=2, proj_gap=10)
    per_matrix = refresh_steps(opt, m, 30)
    later = [s for steps in per_matrix for s in steps if s > 1]
    assert len(set(later)) >= 5  # six matrices refresh on (nearly) distinct steps
    for steps in per_matrix:  # each still refreshes once every gap after the first basis
        assert steps[0] == 1 and all(b - a == 10 for a, b in zip(steps[1:], steps[2:]))


def test_synchronized_refresh_when_asked_and_for_the_reference_policy():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(4)])
    for opts in (dict(stagger=False), dict(refresh="reference")):
        opt = snsm.AdamWSNSM(m.parameters(), rank=2, proj_gap=10, **opts)
        assert all(steps == [1, 10, 20, 30] for steps in refresh_steps(opt, m, 30))


class _Spy:
    """The kernel module with its calls counted."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def counted(*args):
            self.calls.setdefault(name, []).append(args)
            return attr(*args)
        return counted


@pytest.mark.skipif(cpu_kernel() is None or not cpu_kernel().sm_step_available(), reason="no BLAS for sm_step")
@pytest.mark.parametrize("name", SM_CLASSES)
@pytest.mark.parametrize("refresh", ["transport", "reference"])
def test_one_pass_subspace_step_matches_reference_across_blocks(name, refresh, monkeypatch):
    """The one-pass subspace step works block by block of the tall frame's rows: a tall matrix of 700
    rows and a wide one of 600 columns span two blocks (one of them partial); one fused_step call per
    step takes both whole, beside the coordinate-wise tensors, and matches the reference path,
    refreshes included."""
    spy = _Spy(cpu_kernel())
    monkeypatch.setattr(fused, "kernel_for", lambda device: spy)

    def run_big(use_fused):
        torch.manual_seed(0)
        m = nn.ModuleDict(dict(tall=nn.Linear(40, 700, bias=False), wide=nn.Linear(600, 30, bias=False),
                               emb=nn.Embedding(50, 8)))
        groups = [{"params": [m["tall"].weight, m["wide"].weight]},
                  {"params": [m["emb"].weight], "rank": None, "subset_size": None, "lr": 3e-3}]
        opt = getattr(snsm, name)(groups, lr=1e-2, rank=5, proj_gap=3, refresh=refresh, weight_decay=0.1,
                                  fused=use_fused, foreach=False)
        gen = torch.Generator().manual_seed(3)
        for _ in range(7):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return m, opt

    mf, of = run_big(True)
    calls = spy.calls["fused_step"]
    assert len(calls) == 7  # one per step, for both groups
    assert all(len(args[0]) == 1 and len(args[7]) == 2 for args in calls)  # the embedding whole, both matrices
    mr, orf = run_big(False)
    for (key, a), b in zip(mf.named_parameters(), mr.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key
    for p, q in zip(mf.parameters(), mr.parameters()):
        for k, t in of.state[p].items():
            assert torch.allclose(t.float(), orf.state[q][k].float(), rtol=1e-4, atol=1e-6), k


class _Basic(_Spy):
    """The kernel module as a kernel with only ``sn_step`` / ``sn_accumulate`` looks (the Triton one)."""

    def __getattr__(self, name):
        if name not in ("sn_step", "sn_accumulate"):
            raise AttributeError(name)
        return super().__getattr__(name)


@pytest.mark.parametrize("name", ["AdamWSN", "AdamWSNSM", "SGDSM"])
def test_a_kernel_without_the_one_call_entry_point_steps_tensor_by_tensor(name, monkeypatch):
    """What the CUDA path does with the Triton kernel: every whole tensor through ``sn_step``, subspace
    matrices through the unfused form; the same trajectory as the reference path."""
    basic = _Basic(cpu_kernel())
    monkeypatch.setattr(fused, "kernel_for", lambda device: basic)
    mf, _ = run(name, True)
    assert len(basic.calls["sn_step"]) > 0 and "fused_step" not in basic.calls
    monkeypatch.undo()
    mr, _ = run(name, False)
    for (key, a), b in zip(mf.named_parameters(), mr.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key


@pytest.mark.skipif(cpu_kernel() is None or not cpu_kernel().sm_step_available(), reason="no BLAS for sm_step")
def test_one_call_step_is_the_same_on_one_thread():
    """fused_step's two queues on one thread (it streams, then computes) give the trajectory of the
    default thread count."""
    def trajectory():
        torch.manual_seed(0)
        m = nn.ModuleDict(dict(tall=nn.Linear(40, 700, bias=False), wide=nn.Linear(600, 30, bias=False),
                               emb=nn.Embedding(3000, 40)))
        groups = [{"params": [m["tall"].weight, m["wide"].weight]},
                  {"params": [m["emb"].weight], "rank": None, "subset_size": None}]
        opt = snsm.AdamWSNSM(groups, lr=1e-2, rank=5, proj_gap=3)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    threads = torch.get_num_threads()
    default = trajectory()
    try:
        torch.set_num_threads(1)
        single = trajectory()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(default, single):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_kernel_moves_step_counters_of_either_float_type():
    """The one-call step moves every counter it is given by one, float32 or float64 (a checkpoint's)."""
    m, opt = run("AdamWSNSM", True, steps=2)
    p = next(iter(opt.state))
    opt.state[p]["step"] = opt.state[p]["step"].double()
    m_ref, opt_ref = run("AdamWSNSM", False, steps=2)
    for o, mm in ((opt, m), (opt_ref, m_ref)):
        continue_training(o, mm, seed=5)
    assert opt.state[p]["step"].dtype == torch.float64
    assert all(int(st["step"]) == 5 for st in opt.state.values())
    for a, b in zip(m.parameters(), m_ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_bad_step_counter_is_refused_before_any_tensor_moves():
    k = cpu_kernel()
    p, g, m = torch.randn(4, 8), torch.randn(4, 8), torch.zeros(4, 8)
    before = [t.clone() for t in (p, m)]
    good, bad = torch.tensor(3.0), torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match="step counter"):
        k.fused_step([p], [g], [m], [torch.empty(0)], [0], [0], [0.9, 1.0, 0.0, 1e-8, 0.1, 1.0],
                     [], [], [], [], [], [], [], [good, bad])
    assert torch.equal(p, before[0]) and torch.equal(m, before[1]) and float(good) == 3.0


FUSED_SHAPES = [  # (layout, shape, row_len): several pieces, rows shorter and longer than a vector block,
    (1, (5000, 37), 37),  # ragged tails, column matrices taken whole and (over 2^21 entries) split
    (1, (3, 2100), 2100),
    (1, (9000, 8), 8),
    (2, (70, 1000), 1000),
    (2, (2100, 1000), 1000),
    (0, (300, 301), 0),
]


@pytest.mark.parametrize("layout,shape,row_len", FUSED_SHAPES, ids=[f"{l}-{s[0]}x{s[1]}" for l, s, _ in FUSED_SHAPES])
@pytest.mark.parametrize("has_m", [True, False])
def test_one_call_step_computes_the_defined_step_for_every_layout(layout, shape, row_len, has_m):
    from triton_cases import definition

    gen = torch.Generator().manual_seed(1)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen) if has_m else torch.empty(0)
    v = torch.rand({0: p.numel(), 1: shape[0], 2: shape[1]}[layout], generator=gen)
    coef = (0.9, 0.99, 0.01, 1e-8, 0.01, 0.999)
    ours, want = [t.clone() for t in (p, g, m, v)], [t.clone() for t in (p, g, m, v)]
    step = torch.tensor(4.0)
    cpu_kernel().fused_step([ours[0]], [ours[1]], [ours[2]], [ours[3]], [layout], [row_len], list(coef),
                            [], [], [], [], [], [], [], [step])
    b1, vd, vg, eps, scale, decay = coef
    definition(*want, layout, row_len, b1, vd, vg, True, eps, scale, decay)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(step) == 5.0
    # the same bits on one thread (piece boundaries and sums do not depend on the thread count)
    again = [t.clone() for t in (p, g, m, v)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu_kernel().fused_step([again[0]], [again[1]], [again[2]], [again[3]], [layout], [row_len], list(coef),
                                [], [], [], [], [], [], [], [])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(ours, again):
        assert torch.equal(a, b)


SUBSPACE_SHAPES = [  # (m, n, r): frames with ranks and widths on and off the 16-wide tiles, rows in
    (1000, 256, 64),  # blocks with partial six-row strips; wide ones (transposed in 8 x 8 tiles) with
    (997, 40, 5),  # both sides on and off the 8-multiples, and smaller than a tile
    (301, 250, 70),
    (64, 48, 16),
    (130, 700, 20),
    (256, 688, 64),
    (37, 301, 7),
    (5, 9, 3),
]


@pytest.mark.skipif(cpu_kernel() is None or not cpu_kernel().sm_step_available(), reason="no BLAS for sm_step")
@pytest.mark.parametrize("m,n,r", SUBSPACE_SHAPES, ids=[f"{m}x{n}-r{r}" for m, n, r in SUBSPACE_SHAPES])
def test_one_pass_subspace_step_computes_the_defined_step(m, n, r):
    """fused_step's one-pass subspace step against its equations in float64, with A the tall frame
    (G, or G^T when wide), Q the basis, Mo the frame's momentum, D_i = sqrt(v_i) + eps:
    R = A Q, Mo <- b1 Mo + (1 - b1) R, v_i <- vd v_i + vg |A_i|^2,
    W <- (W - s A / D) decay - s decay ((Mo - R) / D) Q^T."""
    gen = torch.Generator().manual_seed(2)
    tall = m >= n
    rows, cols = (m, n) if tall else (n, m)
    p, g = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    q = torch.linalg.qr(torch.randn(cols, r, generator=gen)).Q.contiguous()
    mom = torch.randn((rows, r) if tall else (r, rows), generator=gen)
    v = torch.rand(rows, generator=gen)
    b1, vd, vg, eps, s, decay = 0.9, 0.99, 0.01, 1e-8, 0.01, 0.999
    ours = [t.clone() for t in (p, mom, v)]
    cpu_kernel().fused_step([], [], [], [], [], [], [], [ours[0]], [g], [ours[1]], [q], [ours[2]], [m, n, int(tall)],
                            [b1, vd, vg, eps, s, decay], [])

    def frame(t):
        return t.double() if tall else t.double().T

    a, w, mo, qd = frame(g), frame(p), frame(mom), q.double()
    rr = a @ qd
    mo = b1 * mo + (1 - b1) * rr
    vv = vd * v.double() + vg * (a * a).sum(1)
    d = (vv.sqrt() + eps)[:, None]
    w = (w - s * a / d) * decay - s * decay * ((mo - rr) / d) @ qd.T
    torch.testing.assert_close(frame(ours[0]), w, rtol=1e-5, atol=2e-6, check_dtype=False)
    torch.testing.assert_close(frame(ours[1]), mo, rtol=1e-5, atol=2e-6, check_dtype=False)
    torch.testing.assert_close(ours[2].double(), vv, rtol=1e-5, atol=1e-6)


GRAM_SHAPES = [  # (M, N): N on and off the 16-wide tiles, every remainder of the six-row strips, M over
    # several row chunks
    (1000, 256), (997, 40), (301, 250), (64, 48), (300, 7), (5, 1), (3000, 100), (2, 33), (500, 11), (123, 14),
]


@pytest.mark.parametrize("m,n", GRAM_SHAPES, ids=[f"{m}x{n}" for m, n in GRAM_SHAPES])
def test_gram_is_a_transpose_a_exactly_symmetric_on_any_thread_count(m, n):
    """The kernel's Gram matrix (what an "svd" refresh factors) against A^T A in float64; its lower
    triangle is its upper one; one thread sums every entry in the order two do."""
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    ours = cpu_kernel().gram(a)
    ref = a.double().T @ a.double()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * ref.diagonal().max().item())
    assert torch.equal(ours, ours.T)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cpu_kernel().gram(a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ours)


def test_gram_refuses_what_it_cannot_read():
    k = cpu_kernel()
    for bad in (torch.randn(8, 6).T, torch.randn(8, 6, dtype=torch.float64), torch.randn(8)):
        with pytest.raises(RuntimeError, match="contiguous 2-D float32"):
            k.gram(bad)


def test_svd_refresh_takes_the_kernels_gram_for_a_contiguous_tall_frame(monkeypatch):
    """build_projector("svd") on a head-sized gradient gets its Gram matrix from the kernel, and
    the basis spans the leading right singular vectors; a wide gradient (a transposed frame)
    takes the matmul, the same subspace."""
    from snsm import subspace as sm

    calls = []
    real = cpu_kernel().gram

    spy = types.SimpleNamespace(gram=lambda a: calls.append(tuple(a.shape)) or real(a))
    monkeypatch.setattr(sm, "cpu_kernel", lambda: spy)
    gen = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(4096, 32, generator=gen)).Q
    vt = torch.linalg.qr(torch.randn(64, 32, generator=gen)).Q.T
    g = u @ torch.diag(torch.logspace(0, -3, 32)) @ vt  # 4096 x 64, known right singular vectors
    top = vt[:8].T
    for grad in (g, g.T.contiguous()):
        q = sm.build_projector("svd", grad, 8)
        assert q.shape == (64, 8)
        # the same subspace: the projector onto one maps the other onto itself
        torch.testing.assert_close(q @ (q.T @ top), top, atol=1e-4, rtol=0)
    assert calls == [(4096, 64)]
