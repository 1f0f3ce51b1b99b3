"""python -m snsm.bench.family: every experiment on its --quick setting, and the family's registry entries."""
import json

import pytest
import torch
from torch import nn

from snsm.bench import family
from snsm.bench.optimizers import REGISTRY, BuildContext
from snsm.bench.train import lr_schedule

EXPECTED_ROWS = {
    "adago-regression": ["adam", "muon", "adago", "adam+cosine", "muon+cosine", "adago+cosine"],
    "adago-images": ["adam", "muon", "adago", "adam+cosine", "muon+cosine", "adago+cosine"],
    "adadagrad": ["fixed-8", "fixed-32", "norm-test", "inner-product-test"],
    "adagrad-norm-tails": ["sgd (theory eta)", "adagrad-norm (theory eta)", "sgd (tuned eta)",
                           "adagrad-norm (tuned eta)", "sgd (10x theory eta)", "adagrad-norm (10x theory eta)"],
    "metastorm": ["adam", "sgd-momentum", "adagrad", "metastorm", "metastorm-sn", "metastorm-tensor"],
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(family.EXPERIMENTS))
def test_quick_experiment_writes_its_table_json_and_plot(name, tmp_path, capsys, one_thread):
    out = tmp_path / name
    assert family.main([name, "--quick", "--seeds", "2", "--data", "synthetic", "--no-progress",
                        "--out", str(out)]) == 0
    res = json.loads((out / f"{name}.json").read_text())
    assert [r["name"] for r in res["rows"]] == EXPECTED_ROWS[name]
    md = (out / f"{name}.md").read_text()
    for row in EXPECTED_ROWS[name]:
        assert f"| {row} |" in md
    assert "Verdicts (measured):" in md and res["verdicts"]
    assert f"python -m snsm.bench.family {name} --quick" in md
    assert f"{name}.md" in capsys.readouterr().out
    if name == "adagrad-norm-tails":
        for r in res["rows"]:
            assert set(r["min_grad_norm"]) == {"p50", "p95", "p99", "max"}
        assert set(res["theory"]["results"]) == {"dense", "sqrt", "single"}
    else:
        for r in res["rows"]:
            assert r["lr"] > 0 and len(r["runs"]) == 2
            if r["sweep"].get("from"):  # adadagrad's adaptive rows: the small batch's lr, as the paper
                assert r["lr"] == res["rows"][0]["lr"]
            else:
                assert f"{r['lr']:g}" in r["sweep"]["grid"]  # the reported lr is the sweep's
    if name == "metastorm":  # equal gradient evaluations: a MetaSTORM step costs two
        evals = {r["name"]: r["runs"][0]["evals"] for r in res["rows"]}
        steps = {r["name"]: r["runs"][0]["steps"] for r in res["rows"]}
        assert evals["metastorm"] <= evals["adam"] == steps["adam"]
        assert steps["metastorm"] == (evals["metastorm"] + 1) // 2
    if name == "adadagrad":  # equal samples; the adaptive batches start small and never shrink
        samples = {r["name"]: r["runs"][0]["samples"] for r in res["rows"]}
        assert len(set(samples.values())) == 1
        for r in res["rows"][2:]:
            sizes = [b for _, b in r["runs"][0]["batch_history"]]
            assert sizes[0] == 8 and max(sizes) <= 32
        assert set(res["scans"]) == {"norm", "inner_product"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / f"{name}.png").stat().st_size > 0


def test_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit):
        family.main(["--help"])
    text = capsys.readouterr().out
    for name in family.EXPERIMENTS:
        assert name in text
    with pytest.raises(SystemExit):
        family.main(["nope"])


def test_stream_reads_every_sample_once_per_epoch():
    s = family.Stream(10, seed=0)
    seen = torch.cat([s.next(3) for _ in range(10)])  # 30 samples: 3 epochs, across boundaries
    for epoch in range(3):
        assert sorted(seen[10 * epoch:10 * (epoch + 1)].tolist()) == list(range(10))


def test_tail_runs_converge_without_noise_and_flag_divergence():
    for method, eta in (("sgd", 0.2), ("adagrad-norm", 3.0)):
        r = family.tail_runs(method, eta, d=8, seeds=4, steps=200, sigma=0.0, b0=1e-2, seed=0)
        assert (r["min_grad_norm"] < 1e-2).all()
    r = family.tail_runs("sgd", 50.0, d=8, seeds=4, steps=100, sigma=1.0, b0=1e-2, seed=0)
    assert not torch.isfinite(r["final_grad_norm"]).any()
    assert family._quantiles(r["final_grad_norm"])["p99"] is None


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 8))


CTX = BuildContext(rank=4, proj_gap=5, hidden=16, heads=2, aux_lr=1e-3)


def test_metastorm_entries_build_their_granularity_and_step_with_a_closure():
    import snsm
    for name, granularity in (("metastorm", "coordinate"), ("metastorm-sn", "subset")):
        model = _net()
        opt = REGISTRY[name].build(model, 1e-2, CTX)
        assert isinstance(opt, snsm.MetaSTORM)
        assert all(g["granularity"] == granularity and g["ema"] == 0.99 for g in opt.param_groups)
        x, y = torch.randn(5, 12), torch.randn(5, 8)
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        assert len(calls) == 5  # one gradient at the first step, two at every later one
        w = model[0].weight
        sums = opt.state[w]["sum_d"]
        if granularity == "subset":  # Subset-Norm on the linear weights: one sum per row (16 x 12 is tall)
            assert sums.shape == (16, 1)
            assert opt.state[model[1].weight]["sum_d"].shape == (16,)  # the norm scale: per coordinate
        else:
            assert sums.shape == w.shape


def test_adago_sm_has_rank_and_adago_holds_its_peak_lr():
    import snsm
    model = _net()
    opt = REGISTRY["adago-sm"].build(model, 0.1, CTX)
    assert isinstance(opt, snsm.AdaGO)
    assert opt.param_groups[0]["rank"] == CTX.rank and opt.param_groups[0]["proj_gap"] == CTX.proj_gap
    assert opt.param_groups[-1]["rank"] is None and opt.param_groups[-1]["subset_size"] is None
    assert REGISTRY["adago"].build(_net(), 0.1, CTX).param_groups[0]["rank"] is None
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    w = model[0].weight
    assert opt.state[w]["exp_avg"].numel() == max(w.shape) * CTX.rank  # the momentum in the rank-r subspace
    # the paper's constant eta: the benchmark's scheduler keeps the orthogonalized group at its peak, the
    # AdamW group follows the schedule
    sched = lr_schedule(opt, "adago-sm", lambda s: 0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[-1]["lr"] == pytest.approx(1e-4)
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[-1]["lr"] == pytest.approx(1e-4)


