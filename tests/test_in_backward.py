"""Steps inside backward: the ordinary trajectory, bit for bit, for every class and path.

Each configuration of the conformance suite (every public class; defaults, weight decay, each
subset rule, small ranks with each projector and refresh policy, each path) trains N steps in
backward and N ordinary steps, with and without gradient accumulation, and must end on the same
parameters and the same state (layout and values). Checkpoints move between the two modes;
schedulers, ``add_param_group`` and ``remove()`` work; the in-backward clipping modes equal their
definitions.
"""
import io

import pytest
import torch
from torch import nn

import snsm
from test_conformance import INFOS, IDS, make, model

every = pytest.mark.parametrize("cls, label, options", INFOS, ids=IDS)


def batches(steps, micro, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(micro)]
            for _ in range(steps)]


def loss_of(net, x, y, micro):
    return nn.functional.mse_loss(net(x), y) / micro


def ordinary(net, opt, data, scheduler=None):
    for step in data:
        opt.zero_grad()
        for x, y in step:
            loss_of(net, x, y, len(step)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def in_backward(net, opt, data, scheduler=None):
    """The loop keeps its shape: backward steps, then step() and zero_grad() (both find nothing left)."""
    for step in data:
        for i, (x, y) in enumerate(step):
            if i < len(step) - 1:
                with opt.accumulating():
                    loss_of(net, x, y, len(step)).backward()
                assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
            else:
                loss_of(net, x, y, len(step)).backward()
                assert all(p.grad is None for p in net.parameters()), "gradients are freed"
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same(net_a, opt_a, net_b, opt_b):
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), name


@every
@pytest.mark.parametrize("micro", [1, 3])
def test_in_backward_equals_ordinary_steps(cls, label, options, micro):
    data = batches(5, micro)
    net_a, net_b = model(), model()
    opt_a, opt_b = make(cls, options, net_a), make(cls, options, net_b)
    ordinary(net_a, opt_a, data)
    handle = opt_b.step_in_backward()
    in_backward(net_b, opt_b, data)
    handle.remove()
    assert_same(net_a, opt_a, net_b, opt_b)


@every
def test_checkpoints_move_between_the_modes(cls, label, options):
    data = batches(6, 1)
    net_a, net_b = model(), model()
    opt_a, opt_b = make(cls, options, net_a), make(cls, options, net_b)
    ordinary(net_a, opt_a, data)
    ordinary(net_b, opt_b, data[:3])  # ordinary for 3 steps, then resume in backward from a checkpoint
    buf = io.BytesIO()
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net_c = model()
    net_c.load_state_dict(saved["model"])
    opt_c = make(cls, options, net_c)
    opt_c.load_state_dict(saved["opt"])
    opt_c.step_in_backward()
    in_backward(net_c, opt_c, data[3:])
    assert_same(net_a, opt_a, net_c, opt_c)


def test_a_scheduler_and_a_later_param_group_work_in_backward():
    data = batches(6, 1)
    runs = []
    for mode in ("ordinary", "in backward"):
        net = model()
        extra = nn.Parameter(torch.zeros(3))
        opt = snsm.AdamWSNSM(snsm.param_groups(net, rank=2, proj_gap=2), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        if mode == "in backward":
            opt.step_in_backward()
        opt.add_param_group({"params": [extra], "subset_size": None})  # hooked too
        for step in data:
            opt.zero_grad()
            x, y = step[0]
            (loss_of(net, x, y, 1) + (extra * y.mean(0)).sum()).backward()
            if mode == "in backward":
                assert extra.grad is None
            opt.step()
            sched.step()
        runs.append((net, opt, extra.detach().clone()))
    (net_a, opt_a, e_a), (net_b, opt_b, e_b) = runs
    assert_same(net_a, opt_a, net_b, opt_b)
    assert torch.equal(e_a, e_b) and e_a.abs().sum() > 0


def test_remove_returns_to_ordinary_steps_and_a_second_registration_is_refused():
    net = model()
    opt = snsm.AdamWSN(snsm.param_groups(net))
    handle = opt.step_in_backward()
    with pytest.raises(RuntimeError, match="already steps in backward"):
        opt.step_in_backward()
    handle.remove()
    x, y = batches(1, 1)[0][0]
    loss_of(net, x, y, 1).backward()
    assert all(p.grad is not None for p in net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    opt.step_in_backward().remove()  # registering again after remove() is fine


def test_gradients_that_appear_outside_the_hooks_still_step_in_step():
    """A gradient set by hand (no backward) is what is left for ``step()`` to do."""
    net_a, net_b = model(), model()
    opt_a, opt_b = snsm.AdamWSN(net_a.parameters()), snsm.AdamWSN(net_b.parameters())
    opt_b.step_in_backward()
    for net, opt in ((net_a, opt_a), (net_b, opt_b)):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters()))


@pytest.mark.parametrize("clip", ["tensor", "previous"])
@pytest.mark.parametrize("cls", [snsm.AdamWSNSM, snsm.AdaGO])
def test_in_backward_clipping_equals_its_definition(clip, cls):
    max_norm = 0.05
    data = batches(5, 2)
    net_a, net_b = model(), model()
    options = dict(rank=2, proj_gap=2) if cls is snsm.AdamWSNSM else {}
    opt_a, opt_b = make(cls, options, net_a), make(cls, options, net_b)
    previous = None
    for step in data:  # ordinary steps, clipped by hand as the mode defines it
        opt_a.zero_grad()
        for x, y in step:
            loss_of(net_a, x, y, len(step)).backward()
        grads = [p.grad for p in net_a.parameters()]
        if clip == "tensor":
            for g in grads:
                g.mul_((max_norm / (g.norm() + 1e-6)).clamp(max=1.0))
        else:
            total = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
            if previous is not None:
                for g in grads:
                    g.mul_(previous)
            previous = (max_norm / (total + 1e-6)).clamp(max=1.0)
        opt_a.step()
    opt_b.step_in_backward(clip=clip, max_norm=max_norm)
    in_backward(net_b, opt_b, data)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # clipping changed the trajectory (the test would not see a no-op)
    net_c = model()
    opt_c = make(cls, options, net_c)
    ordinary(net_c, opt_c, data)
    assert any(not torch.allclose(a, c) for a, c in zip(net_a.parameters(), net_c.parameters()))


@pytest.mark.parametrize("kwargs, match", [(dict(clip="global"), "Invalid clip"), (dict(max_norm=0.0), "max_norm"),
                                           (dict(max_norm=float("inf")), "max_norm")])
def test_bad_in_backward_options(kwargs, match):
    opt = snsm.AdamWSN(model().parameters())
    with pytest.raises(ValueError, match=match):
        opt.step_in_backward(**kwargs)
    opt.step_in_backward().remove()  # a refused registration left nothing behind


def test_the_previous_clip_factor_resumes_through_the_handles_state():
    """``clip="previous"``: the handle's state_dict carries the last factor across a checkpoint, so the
    first step after a resume is clipped as in the uninterrupted run (and it matters: without it the
    resumed run differs)."""
    data = batches(6, 1)
    max_norm = 0.05

    def fresh():
        net = model()
        return net, snsm.AdamWSN(snsm.param_groups(net))

    net_a, opt_a = fresh()
    opt_a.step_in_backward(clip="previous", max_norm=max_norm)
    in_backward(net_a, opt_a, data)

    results = []
    for carry in (True, False):
        net_b, opt_b = fresh()
        handle = opt_b.step_in_backward(clip="previous", max_norm=max_norm)
        in_backward(net_b, opt_b, data[:3])
        buf = io.BytesIO()
        torch.save({"net": net_b.state_dict(), "opt": opt_b.state_dict(), "clip": handle.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        net_c, opt_c = fresh()
        net_c.load_state_dict(saved["net"])
        opt_c.load_state_dict(saved["opt"])
        handle_c = opt_c.step_in_backward(clip="previous", max_norm=max_norm)
        if carry:
            handle_c.load_state_dict(saved["clip"])
        in_backward(net_c, opt_c, data[3:])
        results.append(all(torch.equal(a, c) for a, c in zip(net_a.parameters(), net_c.parameters())))
    assert results == [True, False]
