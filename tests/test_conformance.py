"""torch.optim's generic optimizer properties, for every public class and several configurations.

In the manner of torch's ``OptimizerInfo`` tests: :data:`INFOS` lists, per
class, configurations (defaults, weight decay, each ``subset_size`` rule, a
small rank with each projector, each refresh policy, each path), and every
test below runs over all of them: state_dict determinism and round trips,
hooks, ``add_param_group``, ``zero_grad``, per-group and tensor learning rates,
closures, parameters without gradients, deepcopy and pickling, printing,
``maximize``, refused torch flags, Python-number step counters, dtype changes
on resume, empty and meta parameters, refused class swaps, and a malformed
state that must fail before anything is written.
"""
import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import snsm

SM = dict(rank=2, proj_gap=2)


def _info(cls, **configs):
    return [(cls, label, options) for label, options in configs.items()]


INFOS = (
    _info(snsm.AdamWSN, default={}, decay=dict(weight_decay=0.1), coordinatewise=dict(subset_size=None),
          fixed16=dict(subset_size=16), sqrt=dict(subset_size=-2), reference=dict(fused=False, foreach=False),
          foreach=dict(foreach=True))
    + _info(snsm.AdamWSNSM, svd=SM, randomized=dict(SM, proj="randomized"), srht=dict(SM, proj="srht"),
            topk=dict(SM, proj="topk"), uniform=dict(SM, proj="uniform"), reset=dict(SM, refresh="reset"),
            reference_refresh=dict(SM, refresh="reference"), fixed16=dict(SM, subset_size=16),
            reference=dict(SM, fused=False, foreach=False))
    + _info(snsm.AdaGradSN, default={}, decay=dict(weight_decay=0.1), reference=dict(fused=False, foreach=False))
    + _info(snsm.AdaGradSNSM, svd=SM, topk=dict(SM, proj="topk"))
    + _info(snsm.RMSpropSN, default={}, foreach=dict(foreach=True))
    + _info(snsm.SGDSM, svd=SM, uniform=dict(SM, proj="uniform"), full=dict(rank=None))
    + _info(snsm.AdaGradNorm, default={}, momentum=dict(momentum=0.9), reference=dict(fused=False, foreach=False))
    + _info(snsm.RMSpropNorm, default={})
    + _info(snsm.AdaGO, default={}, nesterov=dict(nesterov=True), decay=dict(weight_decay=0.1),
            subspace=dict(rank=2, proj_gap=2), subspace_nesterov=dict(rank=2, proj_gap=2, nesterov=True))
)
IDS = [f"{cls.__name__}-{label}" for cls, label, _ in INFOS]
every = pytest.mark.parametrize("cls, label, options", INFOS, ids=IDS)

#: the options AdaGO's groups do not take (it routes by subset_size and has no paths to choose)
_NOT_ADAGO = ("proj", "fused", "foreach")


def model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype=dtype, device=device)


def make(cls, options, net, lr=None, plain=False):
    """``cls`` on ``net`` with ``options``: through ``snsm.param_groups`` (``plain``: one group of every
    parameter, as ``cls(model.parameters())``), constructor options passed as such, the rest per group."""
    options = dict(options)
    if cls is snsm.AdaGO:
        options = {k: v for k, v in options.items() if k not in _NOT_ADAGO}
        return cls(snsm.param_groups(net), **options, **({"lr": lr} if lr is not None else {}))
    accepted = inspect.signature(cls).parameters
    group_keys = {k: options.pop(k) for k in ("rank", "proj", "proj_gap", "refresh") if k in options}
    if "subset_size" in options and cls is not snsm.SGDSM:
        group_keys["subset_size"] = options.pop("subset_size")
    group_keys.update({k: options.pop(k) for k in list(options) if k not in accepted})  # group-only options
    groups = snsm.param_groups(net, **group_keys) if cls is not snsm.SGDSM and not plain else [
        {"params": list(net.parameters()), **group_keys}]
    if lr is not None:
        options["lr"] = lr
    return cls(groups, **options)


def batch(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 4, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)


def loss_of(net, t, dtype=torch.float32):
    x, y = batch(t, dtype)
    return nn.functional.mse_loss(net(x), y)


def train(net, opt, steps, start=0, dtype=torch.float32):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(net, t, dtype).backward()
        opt.step()


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------- basics
@every
def test_steps_reduce_the_loss(cls, label, options):
    net = model()
    opt = make(cls, options, net, lr=0.05 if cls in (snsm.AdaGradNorm, snsm.AdaGO) else 0.01)
    before = sum(loss_of(net, t).item() for t in range(3))
    for _ in range(30):
        train(net, opt, 3)
    after = sum(loss_of(net, t).item() for t in range(3))
    assert after < before


@every
def test_state_dict_is_deterministic_tensor_only_and_resumes_bit_exactly(cls, label, options):
    net_a, net_b = model(), model()
    opt_a, opt_b = make(cls, options, net_a), make(cls, options, net_b)
    train(net_a, opt_a, 3)
    train(net_b, opt_b, 3)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    for key in sd_a["state"]:
        for name, value in sd_a["state"][key].items():
            assert torch.is_tensor(value), name
            assert torch.equal(value, sd_b["state"][key][name]), name
    net_c = model()
    net_c.load_state_dict(net_a.state_dict())
    opt_c = make(cls, options, net_c)
    opt_c.load_state_dict(roundtrip(sd_a))
    train(net_a, opt_a, 3, start=3)
    train(net_c, opt_c, 3, start=3)
    assert same(params_of(net_a), params_of(net_c))


@every
def test_a_state_dict_round_trips_to_the_same_keys(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    train(net, opt, 2)
    keys = [sorted(g) for g in opt.state_dict()["param_groups"]]
    defaults = sorted(opt.defaults)
    opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(roundtrip(opt.state_dict()))
    assert [sorted(g) for g in opt.state_dict()["param_groups"]] == keys
    assert [sorted(g) for g in opt.param_groups] == [sorted(k for k in g if k != "snsm_rules")
                                                    for g in opt.state_dict()["param_groups"]]
    assert sorted(opt.defaults) == defaults


@every
def test_hooks_run(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    seen = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: seen.append("post")),
        opt.register_state_dict_pre_hook(lambda o: seen.append("sd pre")),
        opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd post")),
        opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load pre")),
        opt.register_load_state_dict_post_hook(lambda o: seen.append("load post")),
    ]
    train(net, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "sd pre", "sd post", "load pre", "load post"]
    for h in handles:
        h.remove()
    train(net, opt, 1)
    assert len(seen) == 6


@every
def test_add_param_group_steps_the_new_group(cls, label, options):
    net = model()
    extra = nn.Linear(4, 3)
    opt = make(cls, options, net)
    group = {"params": list(extra.parameters())}
    if cls is snsm.AdaGO:
        group = snsm.param_groups(extra)
        for g in group:
            opt.add_param_group(g)
    else:
        opt.add_param_group(group)
    before = params_of(extra)
    x = torch.randn(5, 4)
    (net(x).sum() + extra(x).sum()).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params_of(extra)))


@every
def test_zero_grad_sets_gradients_to_none(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    loss_of(net, 0).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


@every
def test_a_group_at_lr_zero_does_not_move(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    for g in opt.param_groups:
        g["lr"] = 0.0
        if cls is snsm.AdaGO:
            g["eps"] = 0.0  # AdaGO's eps is a floor on its step size: at lr=0 it would still move by eps
    before = params_of(net)
    train(net, opt, 2)
    assert same(before, params_of(net))


@every
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
def test_a_one_element_tensor_lr_of_any_shape_steps_as_the_number(cls, label, options, shape):
    net_a, net_b = model(), model()
    opt_a = make(cls, options, net_a, lr=0.01)
    opt_b = make(cls, options, net_b, lr=torch.full(shape, 0.01))
    if cls is snsm.AdaGO:  # its AdamW groups take adamw_lr
        for g in opt_b.param_groups:
            g["lr"] = torch.full(shape, g["lr"]) if not torch.is_tensor(g["lr"]) else g["lr"]
    train(net_a, opt_a, 3)
    train(net_b, opt_b, 3)
    for a, b in zip(params_of(net_a), params_of(net_b)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@every
def test_closure_returns_the_loss_and_steps_as_without(cls, label, options):
    net_a, net_b = model(), model()
    opt_a, opt_b = make(cls, options, net_a), make(cls, options, net_b)
    train(net_a, opt_a, 2)

    for t in range(2):
        def closure():
            opt_b.zero_grad()
            loss = loss_of(net_b, t)
            loss.backward()
            return loss
        loss = opt_b.step(closure)
        assert torch.is_tensor(loss) and loss.ndim == 0
    assert same(params_of(net_a), params_of(net_b))


@every
def test_parameters_without_gradients_keep_still_and_get_no_state(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    frozen = net[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train(net, opt, 2)
    assert torch.equal(frozen, before) and not opt.state.get(frozen)


@every
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(cls, label, options, how):
    net = model()
    opt = make(cls, options, net)
    train(net, opt, 2)
    if how == "deepcopy":
        net2, opt2 = copy.deepcopy((net, opt))
    else:
        net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    train(net, opt, 2, start=2)
    train(net2, opt2, 2, start=2)
    assert same(params_of(net), params_of(net2))


@every
def test_printing_names_the_class_and_options(cls, label, options):
    text = repr(make(cls, options, model()))
    assert text.startswith(cls.__name__) and "lr:" in text and "Parameter Group 0" in text


# ------------------------------------------------------------------------- torch flags
@every
def test_maximize_ascends_as_the_negated_gradient_descends(cls, label, options):
    net_a, net_b = model(), model()
    opt_a = make(cls, dict(options, maximize=True), net_a)
    opt_b = make(cls, options, net_b)
    for t in range(4):
        opt_a.zero_grad()
        (-loss_of(net_a, t)).backward()
        opt_a.step()
        opt_b.zero_grad()
        loss_of(net_b, t).backward()
        opt_b.step()
    for a, b in zip(params_of(net_a), params_of(net_b)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(g["maximize"] is True for g in opt_a.param_groups)


@every
@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused_in_groups(cls, label, options, flag):
    opt = make(cls, options, model())
    extra = nn.Linear(4, 3, bias=False).weight
    before = len(opt.param_groups)
    with pytest.raises(ValueError, match=f"{flag}=True"):
        opt.add_param_group({"params": [extra], flag: True})
    assert len(opt.param_groups) == before
    opt.add_param_group({"params": [extra], flag: False})  # False is torch's default: accepted


@pytest.mark.parametrize("cls", [snsm.AdamWSN, snsm.AdaGO])
def test_capturable_is_refused_in_the_constructor(cls):
    with pytest.raises(TypeError, match="capturable"):
        cls(model().parameters(), capturable=True)


# ------------------------------------------------------------------------- loading
@every
def test_a_step_saved_as_a_python_number_loads_and_steps(cls, label, options):
    net_a = model()
    opt_a = make(cls, options, net_a)
    train(net_a, opt_a, 2)
    sd = copy.deepcopy(opt_a.state_dict())  # torch's state_dict shares the state's own dicts
    for state in sd["state"].values():
        state["step"] = float(state["step"])
        for key in ("proj_step", "seed"):
            if key in state:
                state[key] = int(state[key])
    net_b = model()
    net_b.load_state_dict(net_a.state_dict())
    opt_b = make(cls, options, net_b)
    opt_b.load_state_dict(sd)
    assert all(torch.is_tensor(v) for s in opt_b.state.values() for v in s.values())
    train(net_a, opt_a, 2, start=2)
    train(net_b, opt_b, 2, start=2)
    assert same(params_of(net_a), params_of(net_b))


@every
@pytest.mark.parametrize("saved, loaded", [(torch.float64, torch.float32), (torch.float32, torch.float64)],
                         ids=["f64-into-f32", "f32-into-f64"])
def test_resuming_into_parameters_of_another_dtype(cls, label, options, saved, loaded):
    """Floating state is cast to the dtype this optimizer gives the loaded parameters (torch casts it to
    the parameter's dtype): the resumed run steps on any path, as a run that started in that dtype."""
    net_a = model(saved)
    opt_a = make(cls, options, net_a)
    train(net_a, opt_a, 2, dtype=saved)
    net_b = model(loaded)
    net_b.load_state_dict(net_a.state_dict())
    opt_b = make(cls, options, net_b)
    opt_b.load_state_dict(roundtrip(opt_a.state_dict()))  # a checkpoint: no tensor shared with opt_a
    for p in net_b.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt_b.state[p]:
                assert opt_b.state[p][key].dtype == loaded
    train(net_b, opt_b, 2, start=2, dtype=loaded)
    train(net_a, opt_a, 2, start=2, dtype=saved)
    for a, b in zip(params_of(net_a), params_of(net_b)):
        torch.testing.assert_close(a.to(loaded), b, rtol=1e-4, atol=1e-5)


@every
def test_a_malformed_state_fails_before_anything_is_written(cls, label, options):
    net = model()
    opt = make(cls, options, net)
    train(net, opt, 2)
    sd = opt.state_dict()
    last = max(sd["state"])  # the last parameter: every earlier one would step first
    victim = sd["state"][last]
    key = "proj_step" if "proj_step" in victim else ("exp_avg" if "exp_avg" in victim else "exp_avg_sq")
    if key == "proj_step":
        del victim["proj_step"]
    else:
        victim[key] = victim[key].to(torch.int32)  # no floating dtype to be cast back from
    opt.load_state_dict(sd)
    before = params_of(net)
    state_before = copy.deepcopy({id(p): s for p, s in opt.state.items()})
    loss_of(net, 5).backward()
    with pytest.raises(ValueError, match=repr(key) if key == "proj_step" else "int32"):
        opt.step()
    assert same(before, params_of(net))
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state_before[id(p)][k]), k


@every
def test_an_empty_parameter_steps(cls, label, options):
    empty = nn.Parameter(torch.zeros(0, 4))
    holder = nn.Module()
    holder.empty = empty
    opt = make(cls, options, holder, plain=True) if cls is not snsm.AdaGO else cls(
        [{"params": [empty], "subset_size": None}])
    empty.grad = torch.zeros(0, 4)
    opt.step()
    opt.step()
    assert int(opt.state[empty]["step"]) == 2


@every
def test_meta_parameters_step(cls, label, options):
    net = model(device="meta")
    opt = make(cls, {k: v for k, v in options.items() if k not in ("fused",)}, net)
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert all(int(opt.state[p]["step"]) == 2 for p in net.parameters())


@pytest.mark.parametrize("saved_cls, loaded_cls, options", [
    (snsm.AdamWSN, snsm.AdaGradSN, {}),
    (snsm.AdamWSN, snsm.RMSpropSN, {}),
    (snsm.AdamWSNSM, snsm.AdaGradSNSM, SM),
    (snsm.RMSpropSN, snsm.AdamWSN, {}),
    (snsm.AdaGradSN, snsm.AdaGradNorm, {}),
])
def test_a_checkpoint_of_another_class_is_refused(saved_cls, loaded_cls, options):
    net = model()
    opt = make(saved_cls, options, net)
    train(net, opt, 2)
    sd = roundtrip(opt.state_dict())
    other = make(loaded_cls, options, model())
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in other.param_groups])
    with pytest.raises(ValueError, match="cannot load this checkpoint"):
        other.load_state_dict(sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups] == groups_before
    assert not other.state


def test_a_compatible_class_still_loads():
    """AdamW-SN's state is AdamW-SNSM's with rank=None: the same rules, so it loads."""
    net = model()
    opt = snsm.AdamWSN(snsm.param_groups(net))
    train(net, opt, 2)
    other = snsm.AdamWSNSM(snsm.param_groups(model()), rank=None)
    other.load_state_dict(opt.state_dict())
    assert len(other.state) == len(opt.state)
