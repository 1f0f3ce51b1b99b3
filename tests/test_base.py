"""The shared optimizer base: unknown group options warn, refused groups roll back, and every
optimizer (AdaGO's AdamW groups included) steps through the one path chooser."""
import warnings

import pytest
import torch

import snsm
from snsm import fused, paths


def _warnings_of(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_a_misspelled_group_option_warns_once_with_the_closest_option():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = []
    messages = _warnings_of(lambda: opt.append(snsm.AdamWSNSM([{"params": [p], "rnak": 4}], rank=2)))
    assert len(messages) == 1 and "'rnak'" in messages[0] and "did you mean rank?" in messages[0]
    q = torch.nn.Parameter(torch.randn(8, 8))
    again = _warnings_of(lambda: opt[0].add_param_group({"params": [q], "rnak": 4}))
    assert again == []  # once per optimizer


@pytest.mark.parametrize("key, hint", [("update_proj_gap", "did you mean proj_gap?"), ("proj_type", "did you mean proj?"),
                                       ("scale", "no counterpart")])
def test_galore_options_name_ours(key, hint):
    p = torch.nn.Parameter(torch.randn(8, 8))
    messages = _warnings_of(lambda: snsm.AdamWSNSM([{"params": [p], key: 1}], rank=2))
    assert len(messages) == 1 and repr(key) in messages[0] and hint in messages[0]


def test_known_options_and_scheduler_keys_do_not_warn():
    p = torch.nn.Parameter(torch.randn(8, 8))
    group = {"params": [p], "rank": 2, "proj_gap": 5, "initial_lr": 1e-3, "lr": 1e-3}
    assert _warnings_of(lambda: snsm.AdamWSNSM([group])) == []
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    assert _warnings_of(lambda: snsm.AdaGO(snsm.param_groups(model))) == []


def test_a_refused_group_leaves_the_optimizer_as_it_was():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    for opt in (snsm.AdamWSN([a]), snsm.AdaGO([{"params": [a]}])):
        before = len(opt.param_groups)
        with pytest.raises(ValueError, match="weight_decay"):
            opt.add_param_group({"params": [b], "weight_decay": -1.0})
        assert len(opt.param_groups) == before


def test_fused_true_names_the_real_cause():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"the parameter is torch.bfloat16 \(the kernel takes float32\)"):
        snsm.AdamWSN([p], fused=True).step()
    q = torch.nn.Parameter(torch.randn(4, 4))
    q.grad = torch.randn(4, 4)
    before = q.detach().clone()
    opt = snsm.AdamWSN([q], fused=True, state_dtype="bfloat16")
    with pytest.raises(RuntimeError, match="its state is torch.bfloat16"):
        opt.step()
    assert torch.equal(q, before) and not opt.state  # the step that raised changed nothing


def test_adago_adamw_groups_take_the_library_paths(monkeypatch):
    """AdaGO's AdamW groups go through snsm.paths: the fused kernel where it applies, and bf16 state
    written back with stochastic rounding as the other optimizers do."""
    chosen = []
    real = paths.choose_path
    monkeypatch.setattr(paths, "choose_path", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    opt = snsm.AdaGO(snsm.param_groups(model))
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    expected = "fused" if fused.supports(model[0].weight, torch.float32) else "reference"
    assert chosen and set(chosen) == {expected}  # the embedding and the bias

    # bf16 state: written back with stochastic rounding, as AdamWSN's coordinate-wise groups are (same
    # stream: the parameter's place), and not as rounding to nearest would
    def run(make):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 8)
        o = make(emb)
        for _ in range(3):
            emb(torch.tensor([1, 2, 3])).sum().backward()
            o.step()
            o.zero_grad()
        return o.state[emb.weight]["exp_avg_sq"].clone()

    adago = run(lambda emb: snsm.AdaGO([{"params": emb.parameters(), "subset_size": None}], state_dtype="bfloat16",
                                       adamw_lr=0.1))
    sr = run(lambda emb: snsm.AdamWSN(emb.parameters(), lr=0.1, weight_decay=0.0, subset_size=None,
                                      state_dtype="bfloat16"))
    nearest = run(lambda emb: snsm.AdamWSN(emb.parameters(), lr=0.1, weight_decay=0.0, subset_size=None,
                                           state_dtype="bfloat16", stochastic_rounding=False))
    assert adago.dtype == torch.bfloat16 and torch.equal(adago, sr) and not torch.equal(adago, nearest)


def test_the_public_api_is_listed_documented_and_versioned():
    import tomllib

    from conftest import ROOT

    assert len(snsm.__all__) == len(set(snsm.__all__))
    for name in snsm.__all__:
        obj = getattr(snsm, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, name
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if "version" in pyproject["project"].get("dynamic", []):  # the package's version is snsm.__version__
        assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "snsm.__version__"}
    else:
        assert pyproject["project"]["version"] == snsm.__version__
    assert snsm.__version__.count(".") == 2
