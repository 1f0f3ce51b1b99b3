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
        if variant == "norm":  # the paper's META-STORM-SG: a_t weighs d_t, a_{t+1} (through G_t) the step
            a_momentum = (1 + s_a / a0**2) ** (-2 / 3)
            s_a = s_a + sq(g)
            a = (1 + s_a / a0**2) ** (-2 / 3)
        if d is None:
            d = g.clone()
            if variant == "difference":
                a = 1.0
        else:
            tilde = prev_x - c
            if variant == "difference":
                s_a = s_a + sq(prev_g - tilde)
                a = a_momentum = (1 + s_a / a0**2) ** (-2 / 3)
            d = g + (1 - a_momentum) * (d - tilde)
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


def storm_plus(x0, gradient, steps, lr, b0):
    """STORM+ (Levy, Kavis & Cevher, 2021), from its paper: a_{t+1} = (1 + sum_{i<=t} ||g_i||^2)^(-2/3),
    eta_t = lr / (b0 + sum_{i<=t} ||d_i||^2 / a_{i+1})^(1/3), x_{t+1} = x_t - eta_t d_t,
    d_{t+1} = g(x_{t+1}, xi_{t+1}) + (1 - a_{t+1})(d_t - g(x_t, xi_{t+1})). ``gradient(x, t)`` is
    G(x, xi_t). Returns the iterates, the weights a_{t+1} and the directions d_t."""
    x, d, s_g, s_d = x0.clone(), None, 0.0, 0.0
    xs, weights, directions = [], [], []
    for t in range(steps):
        g = gradient(x, t)
        d = g.clone() if d is None else g + (1 - weights[-1]) * (d - gradient(xs[-2] if len(xs) > 1 else x0, t))
        s_g += float(g.square().sum())
        a = (1 + s_g) ** (-2 / 3)
        s_d += float(d.square().sum()) / a
        x = x - lr * d / (b0 + s_d) ** (1 / 3)
        xs.append(x.clone())
        weights.append(a)
        directions.append(d.clone())
    return xs, weights, directions


def scripted_closure(opt, w, gradient, step):
    """A closure whose gradient at the parameter's current value is ``gradient(value, step[0])``."""
    def closure():
        opt.zero_grad()
        w.grad = gradient(w.detach().clone(), step[0])
        return torch.zeros(())
    return closure


@pytest.mark.parametrize("later_gradients", ["zero", "quadratic"])
def test_the_norm_version_at_p_one_third_is_storm_plus(later_gradients):
    """META-STORM-SG with p = 1/3 (q = 1/3), a0 = 1 takes STORM+'s momentum weights and directions
    exactly; its step divides the whole sum of ||d||^2 by the latest weight where STORM+ divides each
    term by its own, so the two iterates coincide while the weight stays put (gradients zero after
    the first step) and META-STORM's steps are otherwise the shorter ones."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    centres = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(8)]
    first = torch.randn(4, 3, generator=gen, dtype=torch.float64)

    def gradient(x, t):
        if later_gradients == "zero":
            return first.clone() if t == 0 else torch.zeros_like(x)
        return x - centres[t]

    lr, b0, steps = 0.5, 1e-12, len(centres)  # STORM+ has no floor: a negligible one for both
    xs, weights, directions = storm_plus(x0, gradient, steps, lr, b0)
    w = nn.Parameter(x0.clone())
    opt = snsm.MetaSTORM([w], lr=lr, a0=1.0, b0=b0 ** (1 / 3), p=1 / 3, variant="norm")  # b0^(1/p) = b0
    step = [0]
    for t in range(steps):
        before = w.detach().clone()
        opt.step(scripted_closure(opt, w, gradient, step))
        step[0] += 1
        state = opt.state[w]
        torch.testing.assert_close(state["d"], directions[t], rtol=1e-12, atol=1e-12)
        a = (1 + float(state["sum_a"])) ** (-2 / 3)
        assert a == pytest.approx(weights[t], rel=1e-12)
        if later_gradients == "zero":
            torch.testing.assert_close(w.detach(), xs[t], rtol=1e-10, atol=1e-12)
        else:  # same direction, a step no longer than STORM+'s from the same point
            ours = (before - w.detach()).norm()
            theirs = (lr * directions[t] / (b0 + sum(float(d.square().sum()) / wt for d, wt in
                                                    zip(directions[:t + 1], weights[:t + 1]))) ** (1 / 3)).norm()
            assert ours <= theirs * (1 + 1e-12)
            if t == 0:
                assert ours == pytest.approx(float(theirs), rel=1e-12)
            else:
                assert ours < theirs * (1 - 1e-6)
            w.data.copy_(xs[t])  # continue from STORM+'s iterate, so the directions stay comparable


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
