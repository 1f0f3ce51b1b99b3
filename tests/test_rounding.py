import io

import pytest
import torch
from torch import nn

import snsm
from snsm.rounding import stochastic_round_


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(sign):
    lo, ulp = 1.0, 2.0**-7  # bfloat16 neighbours of 1 + ulp/4: 1 and 1 + ulp
    x = torch.full((200_000,), sign * (lo + ulp / 4))
    out = stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, gen()).float()
    assert set(out.abs().unique().tolist()) == {lo, lo + ulp}
    assert (out.abs() == lo + ulp).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert out.mean().item() == pytest.approx(x[0].item(), rel=1e-4)  # nearest would give exactly 1


def test_stochastic_rounding_keeps_representable_and_special_values():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), -float("inf"), float("nan")])
    out = stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, gen())
    assert torch.equal(out[:5].float(), x[:5].bfloat16().float())
    assert out[5] == float("inf") and out[6] == -float("inf") and out[7].isnan()
    with pytest.raises(TypeError, match="bfloat16"):
        stochastic_round_(torch.empty(3), torch.ones(3), gen())


def accumulator(stochastic, state_dtype="bfloat16", steps=3000):
    """AdaGrad's running sum of g^2 (one value per row) under a constant gradient: v_t = t * row sum."""
    p = nn.Parameter(torch.zeros(64, 16))
    opt = snsm.AdaGradSN([p], lr=1e-3, state_dtype=state_dtype, stochastic_rounding=stochastic, fused=False)
    p.grad = torch.full_like(p, 0.25)
    for _ in range(steps):
        opt.step()
    return opt.state[p]["exp_avg_sq"].float()


def test_bf16_accumulator_keeps_growing_only_with_stochastic_rounding():
    exact = accumulator(False, "float32")
    assert torch.allclose(exact, torch.full_like(exact, 3000 * 16 * 0.0625))
    nearest = accumulator(False)
    stochastic = accumulator(True)
    # round-to-nearest stalls once the increment (1.0) is below half an ulp of v (v >= 256 in bf16)
    assert (nearest / exact).max() < 0.2
    # unbiased: each row is a random walk around the exact sum (std ~6% here), their mean within ~1%
    assert ((stochastic / exact).mean() - 1).abs() < 0.03
    assert ((stochastic / exact) - 1).abs().max() < 0.25


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def make(name, options, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
    opt = getattr(snsm, name)(snsm.param_groups(model, **options), lr=1e-2, state_dtype="bfloat16")
    return model, opt


@pytest.mark.parametrize("name,options", [("AdamWSN", {}), ("AdamWSNSM", dict(rank=2, proj_gap=3))])
def test_stochastic_rounding_resumes_bit_exactly(name, options):
    model, opt = make(name, options)
    train(model, opt, 7)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt = make(name, options)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make(name, options, seed=1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, 3, start=4)
    for a, b in zip(reference, model.parameters()):
        assert torch.equal(a, b)


def test_stochastic_rounding_differs_from_nearest_and_can_be_turned_off():
    runs = {}
    for stochastic in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
        opt = snsm.AdamWSN(model.parameters(), lr=1e-2, state_dtype="bfloat16", stochastic_rounding=stochastic)
        train(model, opt, 5)
        runs[stochastic] = opt.state[model[0].weight]["exp_avg"].float()
    assert not torch.equal(runs[True], runs[False])
    with pytest.raises(ValueError, match="stochastic_rounding"):
        snsm.AdamWSN(model.parameters(), stochastic_rounding="yes")
