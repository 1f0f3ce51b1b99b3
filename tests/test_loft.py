"""LoFTAdamW: AdamW at full rank, the update equations, alternation, s folded in, resume, peft, state size,
bad input."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import snsm
from snsm.loft import LoFTAdamW, lora_pairs, state_floats

peft = pytest.importorskip("peft")

F64 = torch.float64


def reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def named_pair(r, n, m, dtype=F64, seed=0, zero_b=False):
    gen = torch.Generator().manual_seed(seed)
    a = nn.Parameter(torch.randn(r, n, generator=gen, dtype=dtype))
    b = nn.Parameter(torch.zeros(m, r, dtype=dtype) if zero_b else torch.randn(m, r, generator=gen, dtype=dtype))
    return a, b, [("layer.lora_A.default.weight", a), ("layer.lora_B.default.weight", b)]


def quartic_loss(w, target, x):
    """A non-quadratic loss, so that the gradients' directions change from step to step."""
    return ((x @ (w - target).T) ** 2).mean() + 0.01 * (w ** 4).sum()


# ---------------------------------------------------------------- the paper's full-rank property
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_full_rank_takes_adamws_steps(seed, scaling):
    """m = n = r, invertible factors, damping 0, wd 0: s B_t A_t equals torch.optim.AdamW's W_t started at
    s B_0 A_0 (float64; relative error below 1e-9 over 20 steps, of both factors' moves)."""
    r = 6
    a, b, named = named_pair(r, r, r, seed=seed)
    w = nn.Parameter((scaling * b @ a).detach().clone())
    w0 = w.detach().clone()
    gen = torch.Generator().manual_seed(100 + seed)
    target, x = torch.randn(r, r, generator=gen, dtype=F64), torch.randn(32, r, generator=gen, dtype=F64)
    opt = LoFTAdamW(named, lr=0.03, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, damping=0.0, scaling=scaling)
    ref = torch.optim.AdamW([w], lr=0.03, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    worst = 0.0
    for _ in range(20):
        opt.zero_grad()
        ref.zero_grad()
        quartic_loss(scaling * b @ a, target, x).backward()
        quartic_loss(w, target, x).backward()
        opt.step()
        ref.step()
        worst = max(worst, ((scaling * b @ a - w).norm() / w.norm()).item())
    assert worst < 1e-9, worst
    assert (w - (scaling * named[1][1] @ named[0][1])).norm() < 1e-9 * w.norm()
    assert (w - w0).norm() > 0.05 * w0.norm()  # W really moved


def test_the_full_rank_test_separates_the_consistent_calibration_from_the_released_one():
    """The transcription with the consistent calibration is AdamW at full rank; with the released code's
    transposed second-moment calibration it drifts (LOFT.md: 0.79 relative after 5 steps)."""
    r = 6
    gen = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(r, r, generator=gen, dtype=F64), torch.randn(r, r, generator=gen, dtype=F64)
    target, x = torch.randn(r, r, generator=gen, dtype=F64), torch.randn(32, r, generator=gen, dtype=F64)

    def grad_w(w):
        w = w.detach().requires_grad_(True)
        quartic_loss(w, target, x).backward()
        return w.grad

    w = nn.Parameter((b0 @ a0).clone())
    ref = torch.optim.AdamW([w], lr=0.03, weight_decay=0.0)
    for _ in range(6):
        ref.zero_grad()
        quartic_loss(w, target, x).backward()
        ref.step()
    errors = {}
    for transposed in (False, True):
        a, b = transcription(a0, b0, torch.zeros(r, r, dtype=F64), grad_w, 6, 0.03, (0.9, 0.999), 1e-8, 0.0,
                             (0.0, 0.0), 1.0, "full", False, transposed=transposed)
        errors[transposed] = ((b @ a - w).norm() / w.norm()).item()
    assert errors[False] < 1e-12 and errors[True] > 1e-3, errors


def test_full_rank_is_not_adamw_with_joint_steps():
    """The no-alternation ablation moves W along both projections: not AdamW (a control for the test above)."""
    r = 5
    a, b, named = named_pair(r, r, r)
    w = nn.Parameter((b @ a).detach().clone())
    target, x = torch.randn(r, r, dtype=F64), torch.randn(16, r, dtype=F64)
    opt = LoFTAdamW(named, lr=0.03, weight_decay=0.0, damping=0.0, scaling=1.0, joint=True)
    ref = torch.optim.AdamW([w], lr=0.03, weight_decay=0.0)
    for _ in range(4):
        opt.zero_grad()
        ref.zero_grad()
        quartic_loss(b @ a, target, x).backward()
        quartic_loss(w, target, x).backward()
        opt.step()
        ref.step()
    assert (b @ a - w).norm() > 1e-3 * w.norm()


# ---------------------------------------------------------------- the equations, transcribed
def transcription(a0, b0, w0, grad_w, steps, lr, betas, eps, wd, damping, s, second_moment, joint,
                  transposed=False):
    """LoFT written out loop by loop from snsm/loft.py's docstring (and LOFT.md), independently of the code.
    ``transposed``: the released code's second-moment calibration (R^T C R for A, R C R^T for B)."""
    A, B = a0.clone(), b0.clone()
    r, n = A.shape
    m = B.shape[0]
    b1, b2 = betas
    d_a, d_b = damping
    MA, MB = torch.zeros(r, n, dtype=F64), torch.zeros(m, r, dtype=F64)
    CA = [torch.zeros(r, r, dtype=F64) for _ in range(n)]
    CB = [torch.zeros(r, r, dtype=F64) for _ in range(m)]
    vA, vB = torch.zeros(n, dtype=F64), torch.zeros(m, dtype=F64)
    a_prev = b_prev = None
    eye = torch.eye(r, dtype=F64)
    for t in range(1, steps + 1):
        G = grad_w(w0 + s * B @ A)
        grad_A, grad_B = s * B.T @ G, s * G @ A.T
        a, b = s * A, s * B
        PA, PB = torch.linalg.inv(b.T @ b + d_a * eye), torch.linalg.inv(a @ a.T + d_b * eye)
        gA, gB = PA @ grad_A, grad_B @ PB
        move_a, move_b = (True, True) if joint else (t % 2 == 0, t % 2 == 1)
        if t > 1 and move_a:
            RA = PA @ b.T @ b_prev
            MA = RA @ MA
            CA = [RA.T @ C @ RA if transposed else RA @ C @ RA.T for C in CA]
        if t > 1 and move_b:
            RB = a_prev @ a.T @ PB
            MB = MB @ RB
            CB = [RB @ C @ RB.T if transposed else RB.T @ C @ RB for C in CB]
        a_prev, b_prev = a, b
        MA = b1 * MA + (1 - b1) * gA
        MB = b1 * MB + (1 - b1) * gB
        for j in range(n):
            CA[j] = b2 * CA[j] + (1 - b2) * torch.outer(gA[:, j], gA[:, j])
            vA[j] = b2 * vA[j] + (1 - b2) * (b @ gA[:, j]).square().sum() / m
        for i in range(m):
            CB[i] = b2 * CB[i] + (1 - b2) * torch.outer(gB[i], gB[i])
            vB[i] = b2 * vB[i] + (1 - b2) * (gB[i] @ a).square().sum() / n
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        newA, newB = A, B
        if move_a:
            V = torch.empty(m, n, dtype=F64)
            for i in range(m):
                for j in range(n):
                    V[i, j] = b[i] @ CA[j] @ b[i] if second_moment == "full" else vA[j]
            U = (b @ MA) / (V.clamp(min=0).sqrt() / math.sqrt(c2) + eps)
            newA = (1 - lr * wd) * A - lr / c1 * PA @ b.T @ U
        if move_b:
            V = torch.empty(m, n, dtype=F64)
            for i in range(m):
                for j in range(n):
                    V[i, j] = a[:, j] @ CB[i] @ a[:, j] if second_moment == "full" else vB[i]
            U = (MB @ a) / (V.clamp(min=0).sqrt() / math.sqrt(c2) + eps)
            newB = (1 - lr * wd) * B - lr / c1 * U @ a.T @ PB
        A, B = newA, newB
    return A, B


@pytest.mark.parametrize("second_moment", ["full", "subset"])
@pytest.mark.parametrize("joint", [False, True])
def test_update_equations_match_a_direct_transcription(second_moment, joint):
    torch.manual_seed(3)
    m, n, r, s = 7, 5, 3, 1.5
    a, b, named = named_pair(r, n, m, seed=3)
    a0, b0 = a.detach().clone(), b.detach().clone()
    w0 = torch.randn(m, n, dtype=F64)
    target = torch.randn(m, n, dtype=F64)
    x = torch.randn(12, n, dtype=F64)

    def grad_w(w):
        w = w.detach().requires_grad_(True)
        quartic_loss(w, target, x).backward()
        return w.grad

    options = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, damping=(1e-3, 1e-2))
    opt = LoFTAdamW(named, scaling=s, second_moment=second_moment, joint=joint, **options)
    for _ in range(6):
        w = w0 + s * b @ a
        g = grad_w(w)
        a.grad, b.grad = s * b.detach().T @ g, s * g @ a.detach().T
        opt.step()
    ref_a, ref_b = transcription(a0, b0, w0, grad_w, 6, options["lr"], options["betas"], options["eps"],
                                 options["weight_decay"], options["damping"], s, second_moment, joint)
    torch.testing.assert_close(a.detach(), ref_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach(), ref_b, rtol=1e-10, atol=1e-12)


def test_alternation_b_on_odd_steps_a_on_even():
    a, b, named = named_pair(3, 6, 8, dtype=torch.float32)
    opt = LoFTAdamW(named, lr=0.01, scaling=1.0)
    moved = []
    for _ in range(4):
        before = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        moved.append((not torch.equal(a, before[0]), not torch.equal(b, before[1])))
    assert moved == [(False, True), (True, False), (False, True), (True, False)]
    # both moments every step
    assert opt.state[a]["exp_avg"].abs().sum() > 0 and opt.state[b]["exp_avg"].abs().sum() > 0


def test_peft_init_b_zero_first_step_moves_b_only():
    """peft starts B at 0: the first (B) step is defined and finite, A's first moment is zero."""
    a, b, named = named_pair(4, 10, 12, dtype=torch.float32, zero_b=True)
    opt = LoFTAdamW(named, lr=0.01, scaling=1.0)
    g = torch.randn(12, 10)
    a.grad, b.grad = b.detach().T @ g, g @ a.detach().T
    opt.step()
    assert torch.isfinite(b).all() and b.abs().sum() > 0
    assert opt.state[a]["exp_avg"].abs().sum() == 0


def test_scaling_is_folded_in():
    """alpha/r = 2 with factors (A, B) moves W = W0 + 2 B A exactly as alpha/r = 1 with (A, 2B): lr is AdamW's
    lr on W whatever alpha is (damping 0, float64)."""
    torch.manual_seed(5)
    m, n, r = 9, 7, 3
    a1, b1, named1 = named_pair(r, n, m, seed=5)
    a2 = nn.Parameter(a1.detach().clone())
    b2 = nn.Parameter(2 * b1.detach().clone())
    named2 = [("x.lora_A.default.weight", a2), ("x.lora_B.default.weight", b2)]
    target, x = torch.randn(m, n, dtype=F64), torch.randn(10, n, dtype=F64)
    opt1 = LoFTAdamW(named1, lr=0.05, damping=0.0, scaling=2.0)
    opt2 = LoFTAdamW(named2, lr=0.05, damping=0.0, scaling=1.0)
    for _ in range(8):
        for opt, w in ((opt1, lambda: 2 * b1 @ a1), (opt2, lambda: b2 @ a2)):
            opt.zero_grad()
            quartic_loss(w(), target, x).backward()
            opt.step()
    torch.testing.assert_close(2 * b1 @ a1, b2 @ a2, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- peft
def peft_model(seed=0, alpha=4, second_layer=True):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    targets = ["0", "2"] if second_layer else ["0"]
    config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, modules_to_save=["4"])
    return peft.get_peft_model(base, config)


def regression_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=gen)
    teacher = torch.randn(16, 4, generator=gen)
    return x, torch.tanh(x @ teacher)


@pytest.mark.parametrize("second_moment", ["full", "subset"])
def test_peft_lora_model_loss_drops(second_moment):
    model = peft_model()
    x, y = regression_data()
    opt = LoFTAdamW(model, lr=1e-2, second_moment=second_moment)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    pairs = [n for n, p in model.named_parameters() if p.requires_grad and "partner" in opt.state[p]]
    assert len(pairs) == 4  # two adapters, A and B each
    head = model.base_model.model[4].modules_to_save["default"].weight
    assert set(opt.state[head]) == {"step", "exp_avg", "exp_avg_sq"}


def test_peft_scaling_is_read_from_the_model():
    model = peft_model(alpha=12)  # s = 3
    opt = LoFTAdamW(model)
    assert [g["scaling"] for g in opt.param_groups] == [3.0]
    named = LoFTAdamW(model.named_parameters(), model=model)
    assert named.param_groups[0]["scaling"] == 3.0
    with pytest.raises(ValueError, match="alpha/r = 3.0"):
        LoFTAdamW(model.named_parameters(), model=model, scaling=1.0)


def test_peft_adapters_with_different_alpha_get_their_own_groups():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], alpha_pattern={"2": 8})
    model = peft.get_peft_model(base, config)
    opt = LoFTAdamW(model)
    assert sorted(g["scaling"] for g in opt.param_groups) == [1.0, 4.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_peft_state_size_matches_the_formula():
    model = peft_model()
    x, y = regression_data()
    for second_moment in ("full", "subset"):
        opt = LoFTAdamW(model, lr=1e-3, second_moment=second_moment)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for module in (model.base_model.model[0], model.base_model.model[2]):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            floats = sum(v.numel() for p in (a, b) for k, v in opt.state[p].items() if k != "step")
            m, n, r = b.shape[0], a.shape[1], a.shape[0]
            assert floats == state_floats(m, n, r, second_moment)
        assert state_floats(32, 16, 4, "full") == (32 + 16) * (2 * 4 + 16)
        assert state_floats(32, 16, 4, "subset") == (32 + 16) * (2 * 4 + 1)


def test_peft_conv_adapters_step():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 5 * 5, 2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    x, y = torch.randn(16, 3, 5, 5), torch.randn(16, 2)
    opt = LoFTAdamW(model, lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    a = model.base_model.model[0].lora_A["default"].weight
    assert opt.state[a]["exp_avg"].shape == (2, 3 * 3 * 3)


# ---------------------------------------------------------------- other parameters, clipping, maximize
@pytest.mark.filterwarnings("ignore:LoFTAdamW found no LoRA")
def test_other_parameters_take_torch_adamws_steps_bit_for_bit():
    torch.manual_seed(0)
    w1, w2 = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))
    v1, v2 = nn.Parameter(w1.detach().clone()), nn.Parameter(w2.detach().clone())
    opt = LoFTAdamW([("w1", w1), ("bias", w2)], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([v1, v2], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        g1, g2 = torch.randn(5, 3), torch.randn(4)
        w1.grad, w2.grad, v1.grad, v2.grad = g1, g2, g1.clone(), g2.clone()
        opt.step()
        ref.step()
    assert torch.equal(w1, v1) and torch.equal(w2, v2)


def test_clipping_scales_every_gradient_by_the_projected_global_norm():
    a, b, named = named_pair(3, 6, 8, seed=1)
    other = nn.Parameter(torch.randn(5, dtype=F64))
    named = named + [("head.weight", other)]
    clones = [nn.Parameter(p.detach().clone()) for _, p in named]
    clipped = LoFTAdamW(named, lr=0.01, scaling=1.0, max_grad_norm=0.5)
    plain = LoFTAdamW([(n, c) for (n, _), c in zip(named, clones)], lr=0.01, scaling=1.0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=F64) * 10 for _, p in named]
        # the global norm: the moving factor's full-space projected gradient (B first) and the other gradient
        step = int(clipped.state[a]["step"].item()) + 1 if clipped.state[a] else 1
        bb, aa = b.detach(), a.detach()
        if step % 2 == 1:
            proj = grads[1] @ torch.linalg.inv(aa @ aa.T + 1e-8 * torch.eye(3, dtype=F64)) @ aa
        else:
            proj = bb @ torch.linalg.inv(bb.T @ bb + 1e-6 * torch.eye(3, dtype=F64)) @ grads[0]
        norm = (proj.square().sum() + grads[2].square().sum()).sqrt()
        factor = min(1.0, 0.5 / (norm.item() + 1e-6))
        for (_, p), c, g in zip(named, clones, grads):
            p.grad, c.grad = g, g * factor
        clipped.step()
        plain.step()
    for (_, p), c in zip(named, clones):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-12, atol=1e-14)


def test_maximize_negates_the_gradient():
    a, b, named = named_pair(2, 4, 5, seed=2)
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    up = LoFTAdamW(named, lr=0.01, scaling=1.0, maximize=True)
    down = LoFTAdamW([("l.lora_A.x.weight", a2), ("l.lora_B.x.weight", b2)], lr=0.01, scaling=1.0)
    for _ in range(3):
        ga, gb = torch.randn(2, 4, dtype=F64), torch.randn(5, 2, dtype=F64)
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, -ga, -gb
        up.step()
        down.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


# ---------------------------------------------------------------- state: round trip and resume
def run_steps(model, opt, steps, seed):
    x, y = regression_data(seed)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("second_moment", ["full", "subset"])
def test_resume_from_a_checkpoint_is_bit_identical(second_moment):
    straight = peft_model(seed=1)
    opt = LoFTAdamW(straight, lr=1e-2, second_moment=second_moment, max_grad_norm=1.0)
    run_steps(straight, opt, 7, seed=2)

    first = peft_model(seed=1)
    opt1 = LoFTAdamW(first, lr=1e-2, second_moment=second_moment, max_grad_norm=1.0)
    run_steps(first, opt1, 3, seed=2)
    saved_model, saved_opt = reload(first.state_dict()), reload(opt1.state_dict())
    resumed = peft_model(seed=9)
    resumed.load_state_dict(saved_model)
    opt2 = LoFTAdamW(resumed, lr=1e-2, second_moment=second_moment, max_grad_norm=1.0)
    opt2.load_state_dict(saved_opt)
    run_steps(resumed, opt2, 4, seed=2)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(opt.parameters(), opt2.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])


def test_a_checkpoint_carries_its_second_moment_and_another_class_is_refused():
    model = peft_model()
    opt = LoFTAdamW(model, lr=1e-2)
    run_steps(model, opt, 1, seed=0)
    other = LoFTAdamW(model, lr=1e-2, second_moment="subset")
    other.load_state_dict(reload(opt.state_dict()))  # as torch.optim: the saved options come along
    assert other.param_groups[0]["second_moment"] == "full"
    run_steps(model, other, 1, seed=0)
    sd = reload(opt.state_dict())
    sd["param_groups"][0]["snsm_rules"] = ["adamw-sn"]
    with pytest.raises(ValueError, match="cannot load"):
        other.load_state_dict(sd)


def test_deepcopy_steps_like_the_original():
    """The pairs are found again from the groups' names (the model reference does not survive a copy)."""
    model = peft_model()
    opt = LoFTAdamW(model, lr=1e-2)
    run_steps(model, opt, 2, seed=0)
    model2, opt2 = copy.deepcopy((model, opt))
    run_steps(model, opt, 2, seed=4)
    run_steps(model2, opt2, 2, seed=4)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- bad input
def test_bare_parameters_are_refused():
    model = peft_model()
    with pytest.raises(ValueError, match="names"):
        LoFTAdamW([p for p in model.parameters() if p.requires_grad], scaling=1.0)


def test_named_parameters_need_the_scale():
    model = peft_model()
    with pytest.raises(ValueError, match="lora_alpha / r"):
        LoFTAdamW(model.named_parameters())
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scaling"):
            LoFTAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], scaling=bad)


def test_a_lora_a_without_its_lora_b_is_refused():
    model = peft_model()
    model.base_model.model[0].lora_B["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no lora_B partner"):
        LoFTAdamW(model)
    a, b, named = named_pair(2, 4, 5)
    with pytest.raises(ValueError, match="no lora_A partner"):
        LoFTAdamW(named[1:], scaling=1.0)
    # the same module, another adapter: no pair
    with pytest.raises(ValueError, match="partner"):
        LoFTAdamW([("l.lora_A.one.weight", a), ("l.lora_B.two.weight", b)], scaling=1.0)
    # the two factors in different groups
    with pytest.raises(ValueError, match="same group"):
        LoFTAdamW([{"params": [named[0]]}, {"params": [named[1]]}], scaling=1.0)


@pytest.mark.parametrize("shapes", [((4,), (5, 4)), ((2, 4), (5, 3)), ((2, 4), (5, 2, 3, 3))])
def test_non_lora_looking_pairs_are_refused(shapes):
    a, b = nn.Parameter(torch.randn(*shapes[0])), nn.Parameter(torch.randn(*shapes[1]))
    with pytest.raises(ValueError, match="LoRA"):
        LoFTAdamW([("l.lora_A.default.weight", a), ("l.lora_B.default.weight", b)], scaling=1.0)


@pytest.mark.parametrize("option,value,match", [
    ("lr", -1.0, "lr"), ("betas", (1.0, 0.9), r"betas\[0\]"), ("betas", (0.9, -0.1), r"betas\[1\]"),
    ("betas", (0.9,), "pair"), ("eps", -1e-8, "eps"), ("eps", float("inf"), "eps"),
    ("weight_decay", -0.1, "weight_decay"), ("damping", -1e-6, "damping"),
    ("damping", (1e-6, float("nan")), "damping"), ("damping", (1e-6,), "damping"),
    ("second_moment", "diag", "second_moment"), ("max_grad_norm", 0.0, "max_grad_norm"),
    ("max_grad_norm", -1.0, "max_grad_norm"),
])
def test_bad_options_are_refused(option, value, match):
    _, _, named = named_pair(2, 4, 5)
    with pytest.raises(ValueError, match=match):
        LoFTAdamW(named, scaling=1.0, **{option: value})


@pytest.mark.filterwarnings("ignore:LoFTAdamW found no LoRA")
def test_bad_group_options_are_refused_and_rolled_back():
    a, b, named = named_pair(2, 4, 5)
    opt = LoFTAdamW([("head", nn.Parameter(torch.randn(3)))], lr=0.01)
    with pytest.raises(TypeError, match="joint"):
        opt.add_param_group({"params": named, "scaling": 1.0, "joint": 1})
    with pytest.raises(ValueError, match="global"):
        opt.add_param_group({"params": named, "scaling": 1.0, "max_grad_norm": 1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": named, "scaling": 1.0})
    assert len(opt.param_groups) == 2


def test_one_factor_without_a_gradient_is_refused_before_anything_changes():
    a, b, named = named_pair(2, 4, 5)
    head = nn.Parameter(torch.randn(3, dtype=F64))
    opt = LoFTAdamW(named + [("head", head)], scaling=1.0)
    before = [p.detach().clone() for p in (a, b, head)]
    a.grad, head.grad = torch.randn_like(a), torch.randn_like(head)
    with pytest.raises(ValueError, match="only one factor"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, (a, b, head))) and not opt.state


def test_steps_in_backward_are_refused():
    model = peft_model()
    opt = LoFTAdamW(model)
    with pytest.raises(NotImplementedError, match="inside backward"):
        opt.step_in_backward()
    p = next(iter(opt.parameters()))
    with pytest.raises(NotImplementedError, match="inside backward"):
        opt.step_parameter(p, torch.zeros_like(p))


def test_no_pairs_warns_and_is_adamw():
    with pytest.warns(UserWarning, match="no LoRA factor pairs"):
        LoFTAdamW(nn.Linear(3, 2))


def test_lora_pairs_matches_module_and_adapter():
    t = lambda *s: torch.zeros(*s)  # noqa: E731
    names = ["m.q.lora_A.a1.weight", "m.q.lora_B.a2.weight", "m.q.lora_B.a1.weight", "m.q.lora_A.a2.weight",
             "m.k.lora_A.a1.weight", "m.k.lora_B.a1.weight", "m.k.lora_B.a1.bias", "m.emb.lora_embedding_A.a1"]
    params = [t(2, 4), t(6, 3), t(5, 2), t(3, 4), t(2, 7), t(8, 2), t(8), t(2, 9)]
    pairs, others = lora_pairs(names, params)
    found = {(p.module, p.adapter): (p.A is params[i], p.B is params[j]) for p, (i, j) in zip(
        sorted(pairs, key=lambda p: (p.module, p.adapter)), [(4, 5), (0, 2), (3, 1)])}
    assert found == {("m.k", "a1"): (True, True), ("m.q", "a1"): (True, True), ("m.q", "a2"): (True, True)}
    assert others == [6, 7]


def test_exported():
    assert snsm.LoFTAdamW is LoFTAdamW and "LoFTAdamW" in snsm.__all__


def test_no_r_x_m_x_n_transient():
    """V = K Chat^T: no op of a step allocates more than an m x n matrix (the full variant), or even an
    m x n one (the Subset-Norm variant, whose update is computed on r x n and m x r matrices)."""
    from torch.profiler import ProfilerActivity, profile

    m, n, r = 80, 56, 8
    for second_moment, limit in (("full", max(m * n, m * r * r, n * r * r)), ("subset", max(m * r, n * r))):
        a = nn.Parameter(torch.randn(r, n))
        b = nn.Parameter(torch.randn(m, r))
        opt = LoFTAdamW([("x.lora_A.d.weight", a), ("x.lora_B.d.weight", b)], scaling=1.0,
                        second_moment=second_moment)
        for step in range(3):  # the state is created in the first; B moves in the third, A in the second
            a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
            if step == 0:
                opt.step()
                continue
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                opt.step()
            largest = max(e.cpu_memory_usage for e in prof.events()) // 4
            assert largest <= limit < r * m * n, (second_moment, step, largest)
