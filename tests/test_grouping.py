import pytest
import torch
from torch import nn

import snsm


class Tiny(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 30, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def ids(group):
    return {id(p) for p in group["params"]}


def test_paper_grouping_by_module_type():
    m = Tiny()
    sn, rest = snsm.param_groups(m, rank=4, proj_gap=10)
    assert ids(sn) == {id(m.proj.weight), id(m.head.weight)}
    assert sn["rank"] == 4 and sn["proj_gap"] == 10
    assert ids(rest) == {id(m.embed.weight), id(m.proj.bias), id(m.norm.weight), id(m.norm.bias), id(m.scale)}
    assert rest["subset_size"] is None and rest["rank"] is None


def test_embeddings_option():
    m = Tiny()
    sn, rest = snsm.param_groups(m, embeddings=True)
    assert id(m.embed.weight) in ids(sn) and id(m.embed.weight) not in ids(rest)


@pytest.mark.parametrize("embeddings", [False, True])
def test_tied_parameter_appears_once(embeddings):
    m = Tiny(tie=True)
    groups = snsm.param_groups(m, embeddings=embeddings)
    everything = [id(p) for g in groups for p in g["params"]]
    assert len(everything) == len(set(everything)) == len(list(m.parameters()))
    in_sn = id(m.head.weight) in ids(groups[0]) and len(groups) == 2
    assert in_sn == embeddings  # a tied head/embedding follows the embedding rule


def test_frozen_parameters_are_left_out_and_groups_work_with_every_optimizer():
    m = Tiny()
    m.norm.weight.requires_grad_(False)
    groups = snsm.param_groups(m, rank=2)
    assert id(m.norm.weight) not in {id(p) for g in groups for p in g["params"]}
    for name in ["AdamWSNSM", "AdaGradSNSM", "SGDSM"]:
        getattr(snsm, name)(snsm.param_groups(m, rank=2))
    for name in ["AdamWSN", "AdaGradSN", "RMSpropSN"]:
        getattr(snsm, name)(snsm.param_groups(m))


def test_model_type_is_checked():
    with pytest.raises(TypeError, match="nn.Module"):
        snsm.param_groups([torch.zeros(2)])
