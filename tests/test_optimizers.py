import copy
import math

import pytest
import torch
from torch import nn

import snsm
from conftest import PROJECTIONS, SM_CLASSES, SN_CLASSES


def make(name, params, **kw):
    cls = getattr(snsm, name)
    if name in SM_CLASSES:
        kw.setdefault("rank", 2)
        kw.setdefault("proj_gap", 3)
    return cls(params, **kw)


def two_params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(5))]


def snapshot(opt, params):
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][j], sb[k][j]) for j in sa[k]) for k in sa
    )


# ------------------------------------------------------------------ bad input
BAD_OPTIONS = [
    ("AdamWSN", dict(lr=-1e-3), ValueError, "lr"),
    ("AdamWSN", dict(eps=-1.0), ValueError, "eps"),
    ("AdamWSN", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("AdamWSN", dict(betas=(1.1, 0.999)), ValueError, r"betas\[0\]"),
    ("AdamWSN", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("AdamWSN", dict(betas=(0.9, 1.0)), ValueError, "AdaGradSN"),
    ("AdamWSN", dict(betas=0.9), ValueError, "betas"),
    ("AdamWSN", dict(subset_size="rows"), ValueError, "subset_size"),
    ("AdamWSN", dict(subset_size=0), ValueError, "subset_size"),
    ("AdamWSN", dict(subset_size=2.5), ValueError, "subset_size"),
    ("AdamWSN", dict(state_dtype="int8"), ValueError, "state_dtype"),
    ("AdamWSNSM", dict(rank=0), ValueError, "rank"),
    ("AdamWSNSM", dict(rank=-4), ValueError, "rank"),
    ("AdamWSNSM", dict(rank=2.0), ValueError, "rank"),
    ("AdamWSNSM", dict(proj="qr"), ValueError, "proj.*svd, randomized, srht, topk, uniform"),
    ("AdamWSNSM", dict(refresh="keep"), ValueError, "refresh.*reset, transport, reference"),
    ("AdamWSNSM", dict(proj_gap=0), ValueError, "proj_gap"),
    ("AdaGradSN", dict(momentum=1.0), ValueError, "momentum"),
    ("RMSpropSN", dict(alpha=1.5), ValueError, "alpha"),
    ("SGDSM", dict(momentum=-0.5), ValueError, "momentum"),
    ("AdamWSN", dict(lr="fast"), TypeError, "lr"),
]


@pytest.mark.parametrize("name, options, error, match", BAD_OPTIONS)
def test_bad_options_raise_specific_errors(name, options, error, match):
    with pytest.raises(error, match=match):
        make(name, two_params(), **options)


def test_rank_on_a_full_momentum_variant_is_rejected():
    with pytest.raises(ValueError, match="rank.*SM variant"):
        snsm.AdamWSN([{"params": two_params(), "rank": 4}])
    with pytest.raises(ValueError, match="rank"):
        snsm.RMSpropSN([{"params": two_params(), "rank": 4}])


def test_sgdsm_rejects_subset_norm_options():
    with pytest.raises(ValueError, match="subset_size.*no second moment"):
        snsm.SGDSM([{"params": two_params(), "subset_size": 16}])


def test_complex_and_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        snsm.AdamWSN([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        snsm.AdamWSN([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("name", SN_CLASSES)
def test_sparse_gradient_raises_and_changes_nothing(name):
    params = two_params()
    opt = make(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    params[0].grad = torch.randn(8, 5)
    params[1].grad = torch.randn(5).to_sparse()  # second parameter: the first must not move either
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert same(before, snapshot(opt, params))


@pytest.mark.parametrize("name", SN_CLASSES)
def test_invalid_group_edit_raises_before_any_change(name):
    params = two_params()
    opt = make(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert same(before, snapshot(opt, params))


@pytest.mark.parametrize("key,value", [("eps", -1e-8), ("weight_decay", -0.1), ("proj", "qr"), ("proj_gap", 0),
                                       ("refresh", "never"), ("fused", "yes"), ("state_dtype", "float8")])
def test_editing_any_option_after_steps_is_validated_again(key, value):
    """Validation is cached by the group's options: an edit after the first steps is still caught."""
    params = two_params()
    opt = snsm.AdamWSNSM(params, rank=2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert same(before, snapshot(opt, params))


def test_changing_the_layout_after_the_first_step_is_a_clear_error():
    params = two_params()
    opt = snsm.AdamWSNSM(params, rank=2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["rank"] = 3
    with pytest.raises(ValueError, match="exp_avg.*changed after the first step"):
        opt.step()
    assert same(before, snapshot(opt, params))


def test_add_param_group_validates_and_applies_options():
    params = two_params()
    opt = snsm.AdamWSNSM([params[1]], rank=None)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [params[0]], "rank": 0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [params[0]], "rank": 2, "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["proj"] == "svd"
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[params[0]]["exp_avg"].shape == (8, 2)


# ------------------------------------------------------------------ interop
@pytest.mark.parametrize("name", SN_CLASSES)
def test_scheduler_lr_drives_the_step(name):
    """A scheduler's lr is what the step uses: lr=0 leaves weights alone; halving lr halves a step."""
    params = two_params()
    opt = make(name, params, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.5, 0.0][min(t, 2)])
    moves = []
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        moves.append(sum((p.detach() - b).abs().sum().item() for p, b in zip(params, before)))
    assert moves[0] > 0 and moves[2] == 0.0
    assert opt.param_groups[0]["lr"] == 0.0


def test_tensor_lr_matches_float_lr():
    a, b = two_params(), two_params()
    oa, ob = snsm.AdamWSN(a, lr=0.01), snsm.AdamWSN(b, lr=torch.tensor(0.01))
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    assert all(torch.allclose(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", SN_CLASSES)
def test_closure_and_zero_grad(name):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = make(name, snsm.param_groups(model))
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = snapshot(opt, list(model.parameters()))
    opt.step()  # no gradients: nothing moves
    assert same(before, snapshot(opt, list(model.parameters())))


def test_clip_grad_norm_then_step():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    twin = copy.deepcopy(model)
    opt, opt2 = snsm.AdamWSNSM(snsm.param_groups(model, rank=2)), snsm.AdamWSNSM(snsm.param_groups(twin, rank=2))
    for m in (model, twin):
        nn.functional.mse_loss(m(torch.ones(4, 6)), torch.zeros(4, 3)).mul(100).backward()
    total = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert total > 1.0
    for p in twin.parameters():
        p.grad.mul_(1.0 / (total + 1e-6))
    opt.step()
    opt2.step()
    assert all(torch.allclose(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name", SN_CLASSES)
def test_grad_scaler_skips_nonfinite_steps_and_leaves_state(name):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = make(name, snsm.param_groups(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 6)
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = snapshot(opt, list(model.parameters()))
    scaler.scale(model(x).pow(2).mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # found inf: skipped
    scaler.update()
    assert same(before, snapshot(opt, list(model.parameters())))
    assert scaler.get_scale() < 1024.0


def test_grad_scaler_step_equals_unscaled_step():
    torch.manual_seed(0)
    a = nn.Linear(6, 4)
    b = copy.deepcopy(a)
    oa, ob = snsm.AdamWSN(snsm.param_groups(a)), snsm.AdamWSN(snsm.param_groups(b))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(8, 6)
    scaler.scale(a(x).pow(2).mean()).backward()
    scaler.step(oa)
    b(x).pow(2).mean().backward()
    ob.step()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))


def test_nonfinite_gradient_propagates_like_adamw():
    """Documented behaviour: no filtering inside step (use GradScaler / error_if_nonfinite)."""
    p = nn.Parameter(torch.zeros(4, 3))
    opt = snsm.AdamWSN([p])
    p.grad = torch.full((4, 3), float("nan"))
    opt.step()
    assert torch.isnan(opt.state[p]["exp_avg_sq"]).all()


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("name", SN_CLASSES)
def test_bf16_parameters_keep_float32_state(name):
    params = [nn.Parameter(torch.randn(8, 5).bfloat16()), nn.Parameter(torch.randn(5).bfloat16())]
    opt = make(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        for k, v in opt.state[p].items():
            if k in ("exp_avg", "exp_avg_sq"):
                assert v.dtype == torch.float32, k
        assert p.dtype == torch.bfloat16


@pytest.mark.parametrize("state_dtype", ["bfloat16", torch.bfloat16])
def test_bf16_state_option(state_dtype):
    torch.manual_seed(0)
    p32 = nn.Parameter(torch.randn(16, 8))
    p16 = nn.Parameter(p32.detach().clone())
    o32 = snsm.AdamWSNSM([p32], rank=2)
    o16 = snsm.AdamWSNSM([p16], rank=2, state_dtype=state_dtype)
    assert o16.param_groups[0]["state_dtype"] == "bfloat16"
    for _ in range(5):
        g = torch.randn(16, 8)
        p32.grad, p16.grad = g, g.clone()
        o32.step()
        o16.step()
    assert o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    assert o16.state[p16]["exp_avg_sq"].dtype == torch.bfloat16
    assert o16.state[p16]["proj"].dtype == torch.float32  # the basis stays float32
    rel = ((p16 - p32).norm() / p32.norm()).item()
    assert 0 < rel < 1e-2  # bf16 state rounds, but follows the float32 trajectory


# ------------------------------------------------------------------ training
LRS = {"AdamWSN": 1e-2, "AdamWSNSM": 1e-2, "AdaGradSN": 1e-1, "AdaGradSNSM": 1e-1, "RMSpropSN": 1e-2, "SGDSM": 5e-2}


@pytest.mark.parametrize("name", SN_CLASSES)
def test_each_optimizer_trains_a_small_model(name):
    """A 2-layer MLP on a fixed random regression task: loss must drop by at least 80%."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    opt = make(name, snsm.param_groups(model, **({"rank": 3, "proj_gap": 50} if name in SM_CLASSES else {})),
               lr=LRS[name])
    first = None
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, f"{name}: {first:.4f} -> {loss.item():.4f}"


@pytest.mark.parametrize("proj", PROJECTIONS)
def test_every_projector_trains(proj):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    opt = snsm.AdamWSNSM(snsm.param_groups(model, rank=3, proj=proj, proj_gap=20), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0] and math.isfinite(losses[-1])
