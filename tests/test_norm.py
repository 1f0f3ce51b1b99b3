"""AdaGradNorm / RMSpropNorm: one accumulator per tensor, formula, routing, resume, bad input."""
import io

import pytest
import torch
from torch import nn

import snsm


def reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_one_scalar_accumulator_per_tensor():
    w, b = nn.Parameter(torch.randn(40, 30)), nn.Parameter(torch.randn(7))
    for opt in (snsm.AdaGradNorm([w, b]), snsm.RMSpropNorm([w, b])):
        w.grad, b.grad = torch.randn(40, 30), torch.randn(7)
        opt.step()
        for p in (w, b):
            assert set(opt.state[p]) == {"step", "exp_avg_sq"}
            assert opt.state[p]["exp_avg_sq"].numel() == 1


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adagrad_norm_follows_the_formula(momentum):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = snsm.AdaGradNorm([w], lr=0.3, momentum=momentum, eps=1e-8)
    x, v, m = w.detach().clone(), 0.0, torch.zeros_like(w)
    for _ in range(5):
        g = torch.randn(6, 4, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        v += float(g.square().sum())
        m = momentum * m + (1 - momentum) * g if momentum else g
        x = x - 0.3 * m / (v**0.5 + 1e-8)
        assert torch.allclose(w.detach(), x, rtol=0, atol=1e-12)
    assert ("exp_avg" in opt.state[w]) == (momentum > 0)


def test_rmsprop_norm_follows_the_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = snsm.RMSpropNorm([w], lr=0.01, alpha=0.9, eps=1e-8)
    x, v = w.detach().clone(), 0.0
    for _ in range(4):
        g = torch.randn(5, 3, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        v = 0.9 * v + 0.1 * float(g.square().sum())
        x = x - 0.01 * g / (v**0.5 + 1e-8)
        assert torch.allclose(w.detach(), x, rtol=0, atol=1e-12)


def test_coordinate_wise_group_stays_plain_adagrad():
    """param_groups' subset_size=None group (norms, biases, embeddings) gets coordinate-wise AdaGrad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = snsm.AdaGradNorm(snsm.param_groups(model), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    bias_before = model[0].bias.detach().clone()
    g = model[0].bias.grad.clone()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg_sq"].shape == (1, 1)
    assert opt.state[model[0].bias]["exp_avg_sq"].shape == (3,)
    assert torch.allclose(model[0].bias.detach(), bias_before - 0.1 * g / (g.abs() + 1e-8))


@pytest.mark.parametrize("cls", ["AdaGradNorm", "RMSpropNorm"])
def test_resume_is_bit_exact(cls):
    def run(split):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 6), nn.LayerNorm(6))
        make = lambda: getattr(snsm, cls)(snsm.param_groups(model), lr=1e-2)  # noqa: E731
        opt = make()
        for t in range(8):
            if t == split:
                sd = reload(opt.state_dict())
                opt = make()
                opt.load_state_dict(sd)
            gen = torch.Generator().manual_seed(100 + t)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(None), run(4)))


@pytest.mark.parametrize("cls, options, match", [
    ("AdaGradNorm", dict(subset_size=16), "subset_size.*one accumulator per tensor"),
    ("AdaGradNorm", dict(momentum=1.0), "momentum"),
    ("AdaGradNorm", dict(lr=-1.0), "lr"),
    ("RMSpropNorm", dict(alpha=1.0), "alpha"),
    ("RMSpropNorm", dict(subset_size=-2), "subset_size"),
])
def test_bad_options_raise(cls, options, match):
    with pytest.raises(ValueError, match=match):
        getattr(snsm, cls)([nn.Parameter(torch.randn(3, 3))], **options)


def test_failing_step_changes_nothing():
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = snsm.AdaGradNorm([w, b])
    w.grad, b.grad = torch.randn(4, 4), torch.randn(4)
    opt.step()
    before = [w.detach().clone(), b.detach().clone(), opt.state[w]["exp_avg_sq"].clone()]
    w.grad, b.grad = torch.randn(4, 4), torch.randn(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[w]["exp_avg_sq"], before[2])
