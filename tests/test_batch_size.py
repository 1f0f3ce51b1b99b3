"""AdaptiveBatchSize (AdAdaGrad): the tests' formulas on synthetic gradients, growth rules, resume, bad input."""
import io
import math

import pytest
import torch
from torch import nn

import snsm
from snsm.batch_size import AdaptiveBatchSize, per_sample_grads


def reload(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def accumulate(ctl, w, micro, samples, scale):
    """Gradient accumulation into w.grad: micro-batch j's loss is its mean times `scale`; observe after each."""
    w.grad = None
    for h in micro:  # h: micro-batch mean gradient
        w.grad = h * scale if w.grad is None else w.grad + h * scale
        ctl.observe([w], samples=samples)


def synthetic(k, b, mean, sigma, seed):
    """k micro-batches of b samples each: per-sample g_i = mean + sigma * z (per-coordinate sigma)."""
    gen = torch.Generator().manual_seed(seed)
    samples = mean + sigma * torch.randn(k * b, *mean.shape, generator=gen)
    return samples, samples.reshape(k, b, *mean.shape).mean(1)


def test_norm_test_matches_the_formula_from_micro_batches():
    torch.manual_seed(0)
    k, b = 8, 4
    mean = torch.randn(6, 5) * 0.3
    sigma = torch.rand(6, 5) + 0.5
    _, micro = synthetic(k, b, mean, sigma, seed=1)
    w = nn.Parameter(torch.zeros(6, 5))
    ctl = AdaptiveBatchSize(32, 4096, eta=0.3, granularity=4)
    accumulate(ctl, w, micro, b, scale=1.0 / k)
    hs = micro  # (k, 6, 5)
    var_sum = b * hs.var(0, unbiased=True).sum().item()  # per-sample variance estimate
    g_b = hs.mean(0)
    expected = var_sum / (0.3**2 * g_b.square().sum().item())
    assert ctl.statistic() == pytest.approx(expected, rel=1e-5)
    want = 4 * math.ceil(math.ceil(expected) / 4)
    assert ctl.suggest() == min(4096, max(32, want))


def test_norm_test_estimates_the_true_variance():
    """Many micro-batches: the statistic approaches tr(Sigma) / (eta^2 ||mean||^2) of the generating law."""
    mean = torch.full((50,), 0.2)
    sigma = torch.linspace(0.5, 2.0, 50)
    truth = sigma.square().sum().item() / (0.5**2 * mean.square().sum().item())
    _, micro = synthetic(4000, 2, mean, sigma, seed=3)
    w = nn.Parameter(torch.zeros(50))
    ctl = AdaptiveBatchSize(2, 10**6, eta=0.5, granularity=2)
    accumulate(ctl, w, micro, 2, scale=1.0 / 4000)
    assert ctl.statistic() == pytest.approx(truth, rel=0.05)


def test_loss_scale_cancels():
    _, micro = synthetic(6, 3, torch.randn(10), torch.ones(10), seed=4)
    stats = []
    for scale in (1.0, 1.0 / 6, 1e-3):
        w = nn.Parameter(torch.zeros(10))
        ctl = AdaptiveBatchSize(6, 600, granularity=3)
        accumulate(ctl, w, micro, 3, scale=scale)
        stats.append(ctl.statistic())
    assert stats[1] == pytest.approx(stats[0], rel=1e-4) and stats[2] == pytest.approx(stats[0], rel=1e-4)


def test_inner_product_test_matches_the_formula_and_per_sample_mode():
    torch.manual_seed(0)
    k, b = 10, 2
    mean, sigma = torch.randn(4, 3), torch.full((4, 3), 1.5)
    samples, micro = synthetic(k, b, mean, sigma, seed=5)
    w = nn.Parameter(torch.zeros(4, 3))
    ctl = AdaptiveBatchSize(20, 10**5, test="inner_product", theta=0.4, granularity=2)
    accumulate(ctl, w, micro, b, scale=0.1)
    hs = micro.reshape(k, -1)
    g_b = hs.mean(0)
    expected = b * (hs @ g_b).var(unbiased=True).item() / (0.4**2 * g_b.square().sum().item() ** 2)
    assert ctl.statistic() == pytest.approx(expected, rel=1e-4)
    # per-sample mode: exact sample statistics, b = 1
    ps = AdaptiveBatchSize(20, 10**5, test="inner_product", theta=0.4)
    ps.observe_samples([samples])
    flat = samples.reshape(k * b, -1)
    g = flat.mean(0)
    assert ps.statistic() == pytest.approx((flat @ g).var().item() / (0.4**2 * g.square().sum().item() ** 2), rel=1e-4)
    norm = AdaptiveBatchSize(20, 10**5, eta=0.4)
    norm.observe_samples([samples])
    assert norm.statistic() == pytest.approx(flat.var(0).sum().item() / (0.4**2 * g.square().sum().item()), rel=1e-4)


def test_grows_never_shrinks_and_caps():
    ctl = AdaptiveBatchSize(8, 64, granularity=8)
    w = nn.Parameter(torch.zeros(3))
    sizes = []
    for noise in (10.0, 0.0, 1000.0):
        for j in range(4):  # deterministic micro-gradients with a chosen spread
            w.grad = (w.grad if j else torch.zeros(3)) + torch.tensor([1.0, 0.0, 0.0]) + noise * (-1) ** j * torch.tensor([0.0, 1.0, 0.0])
            ctl.observe([w], samples=2)
        sizes.append(ctl.update())
    assert sizes[0] > 8 and sizes[0] % 8 == 0
    assert sizes[1] == sizes[0]  # no noise: would suggest 0, never shrinks
    assert sizes[2] == 64  # capped
    assert ctl.history == [8] + sizes


def test_one_micro_batch_cannot_estimate_and_keeps_the_size():
    ctl = AdaptiveBatchSize(4, 64)
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    ctl.observe([w], samples=4)
    assert ctl.statistic() is None
    assert ctl.update() == 4


def test_zero_gradient_goes_to_the_cap():
    ctl = AdaptiveBatchSize(4, 64)
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    ctl.observe([w], samples=2)
    w.grad = torch.zeros(3)  # second micro-batch cancels the first: mean 0
    ctl.observe([w], samples=2)
    assert ctl.statistic() == math.inf and ctl.update() == 64


def test_state_round_trip():
    ctl = AdaptiveBatchSize(8, 256, test="inner_product", theta=0.3, granularity=8)
    w = nn.Parameter(torch.zeros(5))
    for j in range(3):
        w.grad = (w.grad if j else torch.zeros(5)) + torch.randn(5)
        ctl.observe(w, samples=8)
    ctl.update()
    fresh = AdaptiveBatchSize(8, 16)
    fresh.load_state_dict(reload(ctl.state_dict()))
    assert fresh.state_dict() == ctl.state_dict()
    assert fresh.batch_size == ctl.batch_size and fresh.test == "inner_product"
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({"batch_size": 8})


def test_per_sample_grads_via_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    grads = per_sample_grads(model, nn.functional.cross_entropy, x, y)
    assert [g.shape for g in grads] == [(6, *p.shape) for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model[2](model[1](model[0](x[2:3]))), y[2:3]).backward()
    assert all(torch.allclose(g[2], p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
    ctl = snsm.AdaptiveBatchSize(2, 64)
    ctl.observe_samples(grads)
    assert ctl.statistic() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0, max_batch_size=8), "batch_size"),
    (dict(batch_size=16, max_batch_size=8), "max_batch_size"),
    (dict(batch_size=8, max_batch_size=64, test="variance"), "test.*norm, inner_product"),
    (dict(batch_size=8, max_batch_size=64, eta=0.0), r"eta.*\(0, inf\)"),
    (dict(batch_size=8, max_batch_size=64, theta=-1.0), "theta"),
    (dict(batch_size=6, max_batch_size=64, granularity=4), "granularity.*multiples"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSize(**kwargs)


def test_mismatched_micro_batches_raise():
    ctl = AdaptiveBatchSize(8, 64)
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    ctl.observe([w], samples=4)
    with pytest.raises(ValueError, match="samples"):
        ctl.observe([w], samples=2)
    with pytest.raises(ValueError, match="observe_samples"):
        ctl.observe_samples([torch.randn(4, 3)])


def test_a_nonfinite_micro_batch_keeps_the_batch_size_once_and_later_steps_estimate():
    """One NaN gradient used to leave every later update() raising 'cannot convert float NaN to integer'."""
    ab = AdaptiveBatchSize(8, 64, eta=1.0)
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float("nan"), 1.0, 2.0])
    ab.observe([p], 4)
    p.grad = p.grad + torch.randn(3)
    ab.observe([p], 4)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert ab.update() == 8
    assert ab.last_statistic is None
    torch.manual_seed(0)
    for _ in range(2):  # later steps: estimated as usual (noisy gradients grow the batch)
        p.grad = None
        for _ in range(4):
            grad = torch.randn(3) * 10.0
            p.grad = grad if p.grad is None else p.grad + grad
            ab.observe([p], 4)
        ab.update()
    assert ab.batch_size > 8 and math.isfinite(ab.last_statistic)
