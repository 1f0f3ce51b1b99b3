import pytest
import torch

import snsm
from snsm import subspace as sm
from conftest import PROJECTIONS


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def spiked(m, n, rank=4, noise=0.05, seed=0):
    """A gradient with a clear spectral gap after `rank`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
    s = torch.tensor([10.0, 8.0, 6.0, 4.0][:rank])
    return u @ torch.diag(s) @ v.T + noise * torch.randn(m, n, generator=g)


def top_right(g, r):
    a = g if g.shape[0] >= g.shape[1] else g.T
    return torch.linalg.svd(a, full_matrices=False).Vh[:r].T


def test_fwht_is_the_orthonormal_hadamard_transform():
    x = torch.randn(16, 3, dtype=torch.float64)
    assert torch.allclose(sm.fwht(x), hadamard(16).double() @ x)
    assert torch.allclose(sm.fwht(sm.fwht(x)), x)  # its own inverse
    with pytest.raises(ValueError, match="power-of-two"):
        sm.fwht(torch.randn(12, 2))


def test_hadamard_rows_are_rows_of_the_orthonormal_hadamard_matrix():
    rows = torch.tensor([0, 5, 13, 2, 15])
    full = sm.fwht(torch.eye(16, dtype=torch.float64))  # H / 4, symmetric
    for columns in (16, 11, 9, 1):
        torch.testing.assert_close(sm.hadamard_rows(rows, 16, columns, torch.float64), full[rows, :columns])
    for order, columns in ((12, 5), (16, 17), (16, 0)):
        with pytest.raises(ValueError, match="power-of-two order"):
            sm.hadamard_rows(rows, order, columns)


@pytest.mark.parametrize("shape", [(5000, 64), (300, 40), (40, 300)])
def test_srht_basis_is_the_subsampled_transform_of_the_padded_gradient(shape):
    """The SRHT projector (rows of H times the signed gradient) spans the subspace the definition
    gives: fwht of the sign-flipped frame zero-padded to a power of two, `2r` random rows of it,
    orthonormalized, then the `r` directions of that sketch that keep the most of the frame."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    rank = 6
    q = sm.build_projector("srht", g, rank, torch.Generator().manual_seed(7))
    a = (g if shape[0] >= shape[1] else g.T).double()
    big, small = a.shape
    padded = 1 << (big - 1).bit_length()
    gen = torch.Generator().manual_seed(7)  # the same draws in the same order
    signs = torch.randint(0, 2, (big, 1), generator=gen).double() * 2 - 1
    rows = torch.randperm(padded, generator=gen)[:2 * rank]
    x = torch.zeros(padded, small, dtype=torch.float64)
    x[:big] = a * signs
    sketch = torch.linalg.qr(sm.fwht(x)[rows].T).Q
    top = sketch @ torch.linalg.svd(a @ sketch, full_matrices=False).Vh[:rank].T
    torch.testing.assert_close((q @ q.T).double(), top @ top.T, atol=2e-4, rtol=0)


@pytest.mark.parametrize("proj", ["svd", "randomized", "srht"])
@pytest.mark.parametrize("shape", [(48, 24), (20, 40)])
def test_dense_projectors_are_orthonormal_projections(proj, shape):
    g = spiked(*shape)
    q = sm.build_projector(proj, g, 4, torch.Generator().manual_seed(1))
    assert q.dtype == torch.float32 and q.shape == (min(shape), 4)
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-5)  # P^T P = I on the subspace
    p = q @ q.T
    assert torch.allclose(p @ p, p, atol=1e-5)  # idempotent


@pytest.mark.parametrize("proj", ["svd", "randomized"])
@pytest.mark.parametrize("shape", [(48, 24), (20, 40)])
def test_svd_and_randomized_find_the_top_subspace(proj, shape):
    g = spiked(*shape)
    q = sm.build_projector(proj, g, 4, torch.Generator().manual_seed(1))
    cosines = torch.linalg.svdvals(top_right(g, 4).T @ q)
    assert cosines.min() > 0.999


@pytest.mark.parametrize("shape", [(4096, 256), (256, 4096), (256, 256), (688, 256), (256, 688)])
def test_svd_of_a_large_matrix_goes_through_its_gram_matrix(shape, monkeypatch):
    g = spiked(*shape)
    assert g.numel() >= sm.GRAM_MIN_ELEMENTS
    calls, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda x: calls.append(x.shape) or eigh(x))
    q = sm.build_projector("svd", g, 4)
    assert calls == [(min(shape), min(shape))]  # the small Gram matrix, not an SVD of the gradient
    assert q.dtype == torch.float32 and q.shape == (min(shape), 4)
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-5)
    assert torch.linalg.svdvals(top_right(g, 4).T @ q).min() > 0.9999


def test_small_matrices_take_the_svd_itself(monkeypatch):
    """Below GRAM_MIN_ELEMENTS (the golden cases' sizes) the basis is the SVD's, signs included."""
    g = spiked(48, 24)
    assert g.numel() < sm.GRAM_MIN_ELEMENTS
    monkeypatch.setattr(torch.linalg, "eigh", lambda x: pytest.fail("eigh called"))
    q = sm.build_projector("svd", g, 4)
    assert torch.equal(q, torch.linalg.svd(g, full_matrices=False).Vh[:4].T.contiguous())


def test_srht_keeps_more_energy_than_a_random_subspace():
    """The reference SRHT keeps ~2% of the energy; a random 4-of-64 subspace keeps ~6%."""
    g = spiked(256, 64, noise=0.1)
    a = g
    energy = a.norm() ** 2
    kept_srht = [(a @ sm.build_projector("srht", g, 4, torch.Generator().manual_seed(s))).norm() ** 2 / energy
                 for s in range(10)]
    kept_random = [(a @ torch.linalg.qr(torch.randn(64, 4, generator=torch.Generator().manual_seed(s))).Q).norm() ** 2
                   / energy for s in range(10)]
    best = (torch.linalg.svdvals(a)[:4] ** 2).sum() / energy  # ~0.60 here
    # the sketch is biased towards the gradient's top directions (measured: 0.34-0.47)
    assert min(kept_srht) > 0.3 and sum(kept_srht) / 10 > 0.6 * best
    assert sum(kept_srht) / 10 > 5 * sum(kept_random) / 10  # random: ~4/64 of the energy


def test_svd_runs_in_float32_for_bf16_gradients():
    g = spiked(48, 24).bfloat16()
    q = sm.build_projector("svd", g, 4)
    assert q.dtype == torch.float32
    assert torch.linalg.svdvals(top_right(spiked(48, 24), 4).T @ q).min() > 0.99


def test_topk_selects_the_largest_rows_of_the_tall_frame():
    g = torch.randn(30, 10)
    g[[3, 17]] *= 50
    assert set(sm.build_projector("topk", g, 2).tolist()) == {3, 17}
    wide = g.T.contiguous()  # wide: columns of the gradient
    assert set(sm.build_projector("topk", wide, 2).tolist()) == {3, 17}


def test_uniform_is_seeded():
    g = torch.randn(30, 10)
    a = sm.build_projector("uniform", g, 5, torch.Generator().manual_seed(3))
    b = sm.build_projector("uniform", g, 5, torch.Generator().manual_seed(3))
    c = sm.build_projector("uniform", g, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and len(set(a.tolist())) == 5


def _with(value):
    g = torch.randn(12, 6)
    g[4, 3] = value
    return g


UNUSABLE = [torch.zeros(12, 6), torch.full((12, 6), float("nan")), _with(float("nan")), _with(float("inf")),
            _with(-float("inf"))]


@pytest.mark.parametrize("bad", UNUSABLE, ids=["zeros", "all-nan", "one-nan", "one-inf", "one-neg-inf"])
@pytest.mark.parametrize("proj", PROJECTIONS)
def test_unusable_gradient_gives_no_projector(bad, proj):
    assert sm.build_projector(proj, bad, 2, torch.Generator().manual_seed(0)) is None
    assert sm.build_projector(proj, bad.T, 2, torch.Generator().manual_seed(0)) is None  # wide


@pytest.mark.parametrize("proj", PROJECTIONS)
def test_a_gradient_with_one_nonzero_entry_is_usable(proj):
    g = torch.zeros(12, 6)
    g[4, 3] = -1e-3
    assert sm.build_projector(proj, g, 2, torch.Generator().manual_seed(0)) is not None


def explicit_numerator(g, m_state, p, is_tall):
    """back(M) + G - back(R), with the projection written as a matrix."""
    a = g if is_tall else g.T
    mom = m_state if is_tall else m_state.T
    if p.is_floating_point():
        out = mom @ p.T + a - (a @ p) @ p.T
    else:
        sel = torch.zeros(a.shape[0], a.shape[0])
        sel[p, p] = 1.0
        back = torch.zeros_like(a)
        back[p] = mom
        out = back + a - sel @ a
    return out if is_tall else out.T


@pytest.mark.parametrize("proj", PROJECTIONS)
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_sgdsm_step_matches_explicit_projection(proj, shape):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = snsm.SGDSM([w], lr=0.1, momentum=0.5, rank=3, proj=proj, proj_gap=100)
    m = None
    for t in range(3):
        g = torch.randn(shape)
        before = w.detach().clone()
        w.grad = g
        opt.step()
        state = opt.state[w]
        p = state["proj"]
        is_tall = shape[0] >= shape[1]
        r = (g if is_tall else g.T)
        r = (r @ p) if p.is_floating_point() else r[p]
        r = r if is_tall else r.T
        m = 0.5 * r if m is None else 0.5 * m + 0.5 * r
        assert torch.allclose(state["exp_avg"], m, atol=1e-6)
        assert torch.allclose(w.detach(), before - 0.1 * explicit_numerator(g, m, p, is_tall), atol=1e-6)


def test_momentum_and_projector_shapes():
    assert sm.momentum_shape(48, 24, 4, "svd") == (48, 4)
    assert sm.momentum_shape(20, 40, 4, "svd") == (4, 40)
    assert sm.momentum_shape(48, 24, 4, "topk") == (4, 24)
    assert sm.momentum_shape(20, 40, 4, "topk") == (20, 4)
    assert sm.projector_shape(20, 40, 4, "srht") == (20, 4)
    assert sm.projector_shape(20, 40, 4, "uniform") == (4,)


def test_dense_transport_is_the_projection_of_the_old_momentum():
    m = torch.randn(10, 3)
    q_old = torch.linalg.qr(torch.randn(6, 3)).Q
    q_new = torch.linalg.qr(torch.randn(6, 3)).Q
    assert torch.allclose(sm.transport(m, q_old, q_new, 10), (m @ q_old.T) @ q_new, atol=1e-6)


def test_row_transport_keeps_shared_rows():
    m = torch.arange(6.0).reshape(3, 2)
    out = sm.transport(m, torch.tensor([0, 4, 7]), torch.tensor([7, 1, 0]), 9)
    assert torch.equal(out, torch.tensor([[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]))


def _refresh_run(refresh):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = snsm.SGDSM([w], lr=0.1, momentum=0.9, rank=2, proj_gap=3, refresh=refresh)
    grads = [spiked(12, 6, rank=2, seed=s) for s in range(3)]
    for g in grads:
        w.grad = g
        opt.step()
    return opt.state[w], grads


def test_refresh_reset_starts_the_new_basis_from_zero():
    state, grads = _refresh_run("reset")  # refresh at step 3
    r = grads[2] @ state["proj"]
    assert torch.allclose(state["exp_avg"], 0.1 * r, atol=1e-6)


def test_refresh_reference_zeroes_momentum_after_the_refresh_step():
    state, _ = _refresh_run("reference")
    assert torch.count_nonzero(state["exp_avg"]) == 0


def test_refresh_transport_carries_momentum():
    state, grads = _refresh_run("transport")
    q_old = sm.build_projector("svd", grads[0], 2)
    m_old = 0.1 * grads[0] @ q_old
    m_old = 0.9 * m_old + 0.1 * grads[1] @ q_old
    expected = 0.9 * (m_old @ q_old.T @ state["proj"]) + 0.1 * grads[2] @ state["proj"]
    assert torch.allclose(state["exp_avg"], expected, atol=1e-5)


@pytest.mark.parametrize("proj", PROJECTIONS)
def test_zero_first_gradient_falls_back_then_recovers(proj):
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = snsm.AdamWSNSM([w], rank=2, proj=proj, proj_gap=100)
    w.grad = torch.zeros(12, 6)
    with pytest.warns(UserWarning, match="projector"):
        opt.step()
    assert int(opt.state[w]["proj_step"]) == 0  # not computed from a gradient yet
    g = spiked(12, 6, rank=2)
    w.grad = g
    opt.step()
    assert int(opt.state[w]["proj_step"]) == 2
    if proj == "svd":
        assert torch.linalg.svdvals(top_right(g, 2).T @ opt.state[w]["proj"]).min() > 0.999


def test_nonfinite_refresh_keeps_the_previous_basis():
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = snsm.AdamWSNSM([w], rank=2, proj_gap=2)
    w.grad = spiked(12, 6, rank=2)
    opt.step()
    basis = opt.state[w]["proj"].clone()
    w.grad = torch.full((12, 6), float("nan"))
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.step()  # step 2 is a refresh step
    assert torch.equal(opt.state[w]["proj"], basis)


def test_rank_too_large_falls_back_to_full_momentum_with_a_warning():
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = snsm.AdamWSNSM([w], rank=6)
    w.grad = torch.randn(12, 6)
    with pytest.warns(UserWarning, match="full momentum"):
        opt.step()
    assert opt.state[w]["exp_avg"].shape == (12, 6) and "proj" not in opt.state[w]


def test_vectors_and_conv_weights_in_a_subspace_group():
    bias = torch.nn.Parameter(torch.randn(8))
    conv = torch.nn.Parameter(torch.randn(16, 3, 3, 3))  # viewed as 16 x 27
    opt = snsm.AdamWSNSM([bias, conv], rank=4)
    bias.grad, conv.grad = torch.randn(8), torch.randn(16, 3, 3, 3)
    opt.step()
    assert opt.state[bias]["exp_avg"].shape == (8,)  # vectors: full momentum
    assert opt.state[conv]["exp_avg"].shape == (4, 27)  # wide view: r x n
    assert opt.state[conv]["exp_avg_sq"].shape == (1, 27)


def test_transport_of_a_nonfinite_momentum_resets_it():
    """A NaN in the subspace momentum would be carried into every direction of the new basis by
    ``transport``: the refresh starts the momentum afresh instead."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = snsm.SGDSM([w], lr=0.1, momentum=0.9, rank=2, proj_gap=3, refresh="transport", stagger=False)
    w.grad = spiked(12, 6, rank=2, seed=0)
    opt.step()
    state = opt.state[w]
    state["exp_avg"][0, 0] = float("nan")  # as one non-finite gradient would leave it
    w.grad = spiked(12, 6, rank=2, seed=1)
    opt.step()
    g = spiked(12, 6, rank=2, seed=2)
    w.grad = g
    opt.step()  # step 3: a refresh
    r = g @ state["proj"]
    assert torch.isfinite(state["exp_avg"]).all()
    assert torch.allclose(state["exp_avg"], 0.1 * r, atol=1e-6)  # restarted: (1 - mu) R of this step only
