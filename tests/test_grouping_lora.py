"""snsm.param_groups on LoRA adapters: the factors get Subset-Norm without subspace momentum (whatever
rank is asked), the frozen base weights are left out. Structure first (no PEFT needed), then PEFT LoRA
on a tiny LlamaForCausalLM from a config (nothing downloaded): AdamW-SN's state on the factors (one
accumulator per row of the tall frame, no projector), the loss drops, a resume is exact."""
import io
import warnings

import pytest
import torch
from torch import nn

import snsm
from snsm.grouping import lora_factors


class FakeLoraLinear(nn.Module):
    """The structure of a PEFT LoRA layer: a frozen base layer and per-adapter factor modules."""

    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.proj = FakeLoraLinear(12, 20, 4)
        self.norm = nn.LayerNorm(20)
        self.head = nn.Linear(20, 16)  # trainable (as PEFT's modules_to_save)


def ids(ps):
    return {id(p) for p in ps}


def test_lora_factors_get_their_own_group_without_subspace_momentum():
    m = FakeModel()
    groups = snsm.param_groups(m, rank=2, proj_gap=5, proj="randomized", lr=0.1)
    assert len(groups) == 3
    linear, lora, rest = groups
    assert ids(linear["params"]) == {id(m.head.weight)} and linear["rank"] == 2 and linear["proj_gap"] == 5
    assert ids(lora["params"]) == ids([m.proj.lora_A["default"].weight, m.proj.lora_B["default"].weight])
    assert lora["rank"] is None and lora["lr"] == 0.1
    assert not {"proj_gap", "proj", "refresh", "stagger", "seed"} & set(lora)
    assert "subset_size" not in lora  # "same": the optimizer's default, as the linear weights
    assert ids(rest["params"]) == ids([m.embed.weight, m.norm.weight, m.norm.bias, m.head.bias])
    everything = ids(p for g in groups for p in g["params"])
    assert id(m.proj.base_layer.weight) not in everything and id(m.proj.base_layer.bias) not in everything
    assert lora_factors(m) == ids(lora["params"])


@pytest.mark.parametrize("lora_subset_size", [None, "auto", 2])
def test_lora_subset_size(lora_subset_size):
    lora = snsm.param_groups(FakeModel(), lora_subset_size=lora_subset_size)[1]
    assert lora["subset_size"] == lora_subset_size


def test_every_optimizer_takes_the_groups():
    m = FakeModel()
    for cls in (snsm.AdamWSNSM, snsm.AdaGradSNSM, snsm.SGDSM):  # SGD-SM keeps no second moment: no subset_size
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = cls(snsm.param_groups(m, rank=2))
        m.proj(torch.randn(3, 12)).sum().backward()
        opt.step()
        m.zero_grad()
    for cls in (snsm.AdamWSN, snsm.RMSpropSN, snsm.AdaGradSN):
        cls(snsm.param_groups(m))


# ---------------------------------------------------------------- PEFT LoRA on a tiny Llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
R = 4


def lora_llama(**lora):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    config = dict(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**{**config, **lora}))


def factors(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def data(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable task: repeat a short pattern
    base = torch.randint(0, CONFIG["vocab_size"], (steps, 4, 4), generator=g)
    return base.repeat(1, 1, 4)


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def test_peft_groups_factors_and_leaves_the_frozen_base_out():
    model = lora_llama(modules_to_save=["lm_head"])
    groups = snsm.param_groups(model, rank=8, proj_gap=10)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids(p for g in groups for p in g["params"]) == trainable  # the frozen base is left out
    linear, lora = groups  # nothing coordinate-wise is trainable: embeddings and norms are frozen
    assert ids(linear["params"]) == {id(model.base_model.model.lm_head.modules_to_save["default"].weight)}
    assert linear["rank"] == 8
    assert ids(lora["params"]) == ids(p for _, p in factors(model)) and lora["rank"] is None


def test_lora_on_the_embedding_follows_the_embeddings_option():
    model = lora_llama(target_modules=["embed_tokens", "q_proj"])
    emb_factors = [p for n, p in factors(model) if "embed" in n]
    assert len(emb_factors) == 2
    groups = snsm.param_groups(model)
    assert ids(emb_factors) <= ids(groups[-1]["params"]) and groups[-1]["subset_size"] is None
    groups = snsm.param_groups(model, embeddings=True)
    assert len(groups) == 1 and ids(emb_factors) <= ids(groups[0]["params"])


def test_adamw_sn_on_lora_factors_state_shapes_and_the_loss_drops():
    model = lora_llama()
    opt = snsm.AdamWSNSM(snsm.param_groups(model, rank=2, proj_gap=3), lr=3e-2, weight_decay=0.0)
    x = data(1)[0]  # memorize one batch
    first = loss_of(model, x).item()
    for _ in range(30):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()
    assert loss_of(model, x).item() < 0.9 * first
    for name, p in factors(model):
        state = opt.state[p]
        # one accumulator per row of the tall frame: A (r x d) one per column, B (d x r) one per row
        assert state["exp_avg_sq"].numel() == max(p.shape), name
        assert state["exp_avg_sq"].shape == ((1, p.shape[1]) if p.shape[0] == R else (p.shape[0], 1))
        assert state["exp_avg"].shape == p.shape  # full momentum, no rank-r projection
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, name


def test_coordinate_wise_lora_factors_are_adamw():
    # eps outside the bias correction (the paper's AdamW) differs from torch's: take it out of the comparison
    model = lora_llama()
    ours = snsm.AdamWSN(snsm.param_groups(model, lora_subset_size=None), lr=1e-2, weight_decay=0.0, eps=1e-12)
    twin = lora_llama()
    ref = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0, eps=1e-12)
    for x in data(5):
        for m, o in ((model, ours), (twin, ref)):
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
    for (_, p), (_, q) in zip(factors(model), factors(twin)):
        assert ours.state[p]["exp_avg_sq"].shape == p.shape
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_resume_on_lora_factors_is_exact():
    batches = data(12)

    def build():
        model = lora_llama()
        return model, snsm.AdamWSN(snsm.param_groups(model, rank=2), lr=3e-2, weight_decay=0.0)

    def train(model, opt, xs):
        for x in xs:
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad()

    full, opt = build()
    train(full, opt, batches)
    half, opt = build()
    train(half, opt, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt = build()
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(resumed, opt, batches[6:])
    for (_, p), (_, q) in zip(factors(full), factors(resumed)):
        assert torch.equal(p, q)
