"""META-STORM: the update equations on a quadratic with known gradients, the closure API (two
evaluations, the previous iterate swapped in and back), every granularity, state round trips and
bad input."""
import io
import math

import pytest
import torch
from torch import nn

import snsm
from snsm.subset_norm import subset_layout


def quadratic_closure(opt, w, centre):
    """f(x) = 0.5 ||x - c||^2 on this minibatch (its centre ``c``): G(x) = x - c."""
    calls = []

    def closure():
        opt.zero_grad()
        calls.append(w.detach().clone())
        loss = 0.5 * (w - centre).square().sum()
        loss.backward()
        return loss

    return closure, calls


def transcription(x0, centres, lr, a0, b0, p, variant, per_coordinate=False):
    """The module doc's equations, written out directly (float64)."""
    q = (1 - p) / 2
    x, prev_x, prev_g, d = x0.clone(), None, None, None
    s_a = torch.zeros_like(x0) if per_coordinate else 0.0
    s_d = torch.zeros_like(x0) if per_coordinate else 0.0
    sq = (lambda v: v * v) if per_coordinate else (lambda v: float(v.square().sum()))
    out = []
    for c in centres:
        g = x - c
        if d is None:
            d, a = g.clone(), 1.0
            if variant == "norm":
                s_a = s_a + sq(g)
        else:
            tilde = prev_x - c
            s_a = s_a + (sq(prev_g - tilde) if variant == "difference" else sq(g))
            a = (1 + s_a / a0**2) ** (-2 / 3)
            d = g + (1 - a) * (d - tilde)
        s_d = s_d + sq(d)
        b = (b0 ** (1 / p) + s_d) ** p / (a ** q if per_coordinate else a**q)
        prev_x, prev_g = x.clone(), g.clone()
        x = x - lr * d / b
        out.append(x.clone())
    return out


@pytest.mark.parametrize("variant", ["difference", "norm"])
@pytest.mark.parametrize("granularity", ["tensor", "coordinate"])
def test_the_update_equations_on_a_quadratic(variant, granularity):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    centres = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    options = dict(lr=0.3, a0=0.7, b0=0.2, p=0.4 if variant == "difference" else 0.3)
    expected = transcription(x0, centres, variant=variant, per_coordinate=granularity == "coordinate", **options)
    w = nn.Parameter(x0.clone())
    opt = snsm.MetaSTORM([w], variant=variant, granularity=granularity, **options)
    for c, want in zip(centres, expected):
        closure, _ = quadratic_closure(opt, w, c)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), want, rtol=1e-12, atol=1e-12)


def test_the_closure_runs_at_the_current_then_the_previous_iterate_and_the_parameters_come_back():
    w = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = snsm.MetaSTORM([w], lr=0.5)
    c = torch.zeros(4, dtype=torch.float64)
    closure, calls = quadratic_closure(opt, w, c)
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.equal(calls[0], torch.ones(4, dtype=torch.float64))  # the first step: once
    assert loss.item() == pytest.approx(2.0)
    x1 = w.detach().clone()
    closure, calls = quadratic_closure(opt, w, c + 1)
    opt.step(closure)
    assert len(calls) == 2
    assert torch.equal(calls[0], x1) and torch.equal(calls[1], torch.ones(4, dtype=torch.float64))
    assert torch.equal(opt.state[w]["prev"], x1)  # stored for the next step; the parameter moved on from x1
    assert not torch.equal(w.detach(), x1)
    assert torch.equal(w.grad, x1 - (c + 1))  # p.grad holds G_t, the gradient at the current iterate


def test_subset_granularity_keeps_one_sum_per_subset_and_matches_coordinate_when_subsets_are_coordinates():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 4))
    opt = snsm.MetaSTORM([w], granularity="subset", subset_size="auto")
    closure, _ = quadratic_closure(opt, w, torch.zeros(16, 4))
    opt.step(closure)
    opt.step(closure)
    assert opt.state[w]["sum_a"].shape == subset_layout(w.shape, "auto").state_shape == (16, 1)
    # per row: the rows' update direction keeps each row's d direction, scaled by the row's b
    runs = []
    for granularity, size in (("subset", 1), ("coordinate", "auto")):
        torch.manual_seed(1)
        v = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
        o = snsm.MetaSTORM([v], granularity=granularity, subset_size=size, lr=0.2)
        for t in range(4):
            closure, _ = quadratic_closure(o, v, torch.full((6, 3), float(t), dtype=torch.float64))
            o.step(closure)
        runs.append(v.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


def test_ema_sums_are_bias_corrected_averages():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = snsm.MetaSTORM([w], ema=0.5, lr=0.1)
    closure, _ = quadratic_closure(opt, w, torch.zeros(3, dtype=torch.float64))
    opt.step(closure)
    # one step: sum_d = (1 - 0.5) ||d||^2 = 0.5 * 3; corrected: 3; b = sqrt(b0^2 + 3) / 1
    assert float(opt.state[w]["sum_d"]) == pytest.approx(1.5)
    torch.testing.assert_close(w.detach(), torch.ones(3, dtype=torch.float64) * (1 - 0.1 / math.sqrt(3 + 1e-16)))


def test_state_round_trips_and_resumes_bit_exactly():
    torch.manual_seed(0)
    net = nn.Linear(6, 2)
    opt = snsm.MetaSTORM(net.parameters(), granularity="coordinate", ema=0.9, lr=0.05)
    data = [(torch.randn(8, 6), torch.randn(8, 2)) for _ in range(8)]

    def run(net, opt, batches):
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss
            opt.step(closure)

    run(net, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = nn.Linear(6, 2)
    net2.load_state_dict(saved["net"])
    opt2 = snsm.MetaSTORM(net2.parameters(), granularity="coordinate", ema=0.9, lr=0.05)
    opt2.load_state_dict(saved["opt"])
    run(net, opt, data[4:])
    run(net2, opt2, data[4:])
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def test_maximize_ascends():
    w1, w2 = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(3, dtype=torch.float64))
    o1, o2 = snsm.MetaSTORM([w1], lr=0.1), snsm.MetaSTORM([w2], lr=0.1, maximize=True)
    for t in range(3):
        c = torch.full((3,), float(t), dtype=torch.float64)
        closure, _ = quadratic_closure(o1, w1, c)
        o1.step(closure)

        def negated():
            o2.zero_grad()
            loss = -0.5 * (w2 - c).square().sum()
            loss.backward()
            return loss
        o2.step(negated)
    torch.testing.assert_close(w1.detach(), w2.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(a0=0.0), "a0"), (dict(b0=float("inf")), "b0"), (dict(p=0.6), "p"),
    (dict(variant="norm", p=0.2), "p"), (dict(variant="sum"), "variant"), (dict(granularity="row"), "granularity"),
    (dict(granularity="subset", subset_size=0), "subset_size"), (dict(ema=1.0), "ema"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        snsm.MetaSTORM([nn.Parameter(torch.ones(2))], **kwargs)


def test_a_step_needs_a_closure_and_in_backward_is_refused():
    w = nn.Parameter(torch.ones(2))
    opt = snsm.MetaSTORM([w])
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    assert not opt.state
    with pytest.raises(RuntimeError, match="twice per step"):
        opt.step_in_backward()
