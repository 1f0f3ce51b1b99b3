import math

import pytest
import torch

import snsm
from snsm.subset_norm import (
    accumulate_,
    divide_by_root,
    largest_divisor_at_most,
    square_sums,
    subset_layout,
)


@pytest.mark.parametrize(
    "shape, subset_size, state_shape",
    [
        ((48, 24), "auto", (48, 1)),  # tall: one subset per row
        ((20, 40), "auto", (1, 40)),  # wide: one per column
        ((16, 16), "auto", (16, 1)),  # square counts as tall
        ((8, 3, 5), "auto", (1, 15)),  # conv-like: viewed as (8, 15)
        ((24,), "auto", (24,)),  # vectors stay coordinate-wise under the shape rule
        ((48, 24), 16, (72, 1)),  # 1152 / 16
        ((7, 9), 16, (7, 1)),  # largest divisor of 63 <= 16 is 9
        ((7, 9), -2, (21, 1)),  # target int(sqrt(63)/2) = 3
        ((24,), -2, (12, 1)),  # flat rule applies to vectors too
        ((20, 40), None, (20, 40)),
    ],
)
def test_layout_state_shapes(shape, subset_size, state_shape):
    assert subset_layout(torch.Size(shape), subset_size).state_shape == state_shape


def test_largest_divisor():
    assert largest_divisor_at_most(63, 16) == 9
    assert largest_divisor_at_most(1152, 16) == 16
    assert largest_divisor_at_most(13, 5) == 1
    assert largest_divisor_at_most(10, 100) == 10


def test_degraded_divisor_is_flagged():
    assert subset_layout(torch.Size([13, 1]), 8).degraded  # prime numel: length 1
    assert not subset_layout(torch.Size([7, 9]), 16).degraded  # 9 of 16 is close enough


def test_square_sums_match_a_loop():
    g = torch.randn(6, 4)
    tall = subset_layout(g.shape, "auto")
    assert torch.allclose(square_sums(g, tall), torch.stack([(row**2).sum() for row in g]).reshape(6, 1))
    wide = subset_layout(g.T.shape, "auto")
    assert torch.allclose(square_sums(g.T, wide), (g.T**2).sum(0, keepdim=True))
    flat = subset_layout(g.shape, 8)  # 24 -> 3 chunks of 8, row-major
    chunks = g.flatten().split(8)
    assert torch.allclose(square_sums(g, flat), torch.stack([(c**2).sum() for c in chunks]).reshape(3, 1))


def test_accumulate_ema_and_sum():
    g = torch.randn(5, 3)
    layout = subset_layout(g.shape, "auto")
    v = torch.ones(5, 1)
    accumulate_(v, g, layout, 0.9)
    assert torch.allclose(v, 0.9 + 0.1 * (g**2).sum(1, keepdim=True))
    v = torch.ones(5, 1)
    accumulate_(v, g, layout, 1.0)
    assert torch.allclose(v, 1 + (g**2).sum(1, keepdim=True))


def test_every_coordinate_of_a_subset_shares_one_step_size():
    g = torch.randn(4, 10)  # wide: per-column subsets
    layout = subset_layout(g.shape, "auto")
    v = square_sums(g, layout)
    out = divide_by_root(torch.ones_like(g), v, layout, 0.0)
    assert torch.allclose(out, (1 / g.norm(dim=0)).expand(4, 10))


def test_one_subset_per_tensor_is_adagrad_norm():
    """With the whole tensor as one subset, AdaGrad-SN divides by the running gradient norm."""
    p = torch.nn.Parameter(torch.zeros(4, 5))
    opt = snsm.AdaGradSN([p], lr=1.0, momentum=0.0, eps=0.0, subset_size=20)
    g1, g2 = torch.randn(4, 5), torch.randn(4, 5)
    p.grad = g1
    opt.step()
    assert torch.allclose(p.detach(), -g1 / g1.norm())
    p.grad = g2
    opt.step()
    expected = -g1 / g1.norm() - g2 / math.sqrt(g1.norm() ** 2 + g2.norm() ** 2)
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert opt.state[p]["exp_avg_sq"].numel() == 1


def test_divisor_degradation_warns_once_naming_the_shape():
    p, q = torch.nn.Parameter(torch.randn(13, 1)), torch.nn.Parameter(torch.randn(13, 1))
    opt = snsm.AdamWSN([p, q], subset_size=8)
    p.grad, q.grad = torch.randn(13, 1), torch.randn(13, 1)
    with pytest.warns(UserWarning, match=r"\(13, 1\)") as record:
        opt.step()
        opt.step()
    assert len([w for w in record if "divisor" in str(w.message)]) == 1


def test_snsm_state_is_one_value_per_subset():
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = snsm.RMSpropSN([p])
    p.grad = torch.randn(64, 32)
    opt.step()
    assert [(k, tuple(v.shape)) for k, v in opt.state[p].items() if v.numel() > 1] == [("exp_avg_sq", (64, 1))]
