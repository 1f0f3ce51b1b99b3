"""The step-time benchmark (``python -m snsm.bench.speed``): what it writes, and its torch.mm row."""
import json

import pytest
import torch

import snsm
from snsm.bench import speed


def test_torch_matmuls_row_does_the_subspace_products_of_exactly_the_routed_matrices():
    model = speed.llama_like("llama_20m")
    mm = speed.TorchMatmuls(model, rank=64)
    h, i, layers, v = speed.SHAPES["llama_20m"]
    assert len(mm.work) == 7 * layers + 1  # every block's seven linears and the head; no embedding
    mm.step()
    for a, q, r, u in mm.work:
        assert a.shape[0] >= a.shape[1] and q.shape == (a.shape[1], 64)
        assert torch.allclose(q.T @ q, torch.eye(64), atol=1e-5)
        assert torch.allclose(r, a @ q, rtol=1e-4, atol=1e-6)
        assert torch.allclose(u, r @ q.T, rtol=1e-4, atol=1e-6)


def test_speed_writes_a_table_with_ratios_to_fused_adamw(tmp_path, capsys):
    rows = "AdamWSN,AdamWSNSM," + speed.TORCH_MATMULS
    assert speed.main(["--models", "llama_20m", "--optimizers", rows, "--proj-gap", "4", "--block", "2",
                       "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "speed.json").read_text())
    assert meta["command"].startswith("python -m snsm.bench.speed --models llama_20m")
    by = {r["optimizer"]: r for r in meta["rows"]}
    assert set(by) == {"AdamW fused", "AdamW foreach", "AdamWSN", "AdamWSNSM", speed.TORCH_MATMULS}
    assert by["AdamW fused"]["vs_fused"] == 1.0 and by["AdamW foreach"]["vs_foreach"] == 1.0
    for r in meta["rows"]:
        assert r["steps"] == 4 and r["median_ms"] > 0
        assert r["vs_fused"] == pytest.approx(r["median_ms"] / by["AdamW fused"]["median_ms"])
    # a subspace row is timed over a whole proj_gap cycle, refreshes included
    assert by["AdamWSNSM"]["amortized_vs_fused"] > 0 and by["AdamWSNSM"]["worst_over_median"] >= 1
    assert by["AdamWSN"]["amortized_vs_fused"] is None
    # state: AdamW-SN keeps one full-size tensor less on the Subset-Norm matrices; the torch.mm row keeps none
    assert by["AdamWSN"]["state_bytes"] < by["AdamW fused"]["state_bytes"]
    assert by[speed.TORCH_MATMULS]["state_bytes"] == 0 and by[speed.TORCH_MATMULS]["peak_step_bytes"] is None
    table = (tmp_path / "speed.md").read_text()
    assert "| llama_20m | AdamWSNSM | 4 |" in table and speed.TORCH_MATMULS in capsys.readouterr().out


def test_speed_rejects_unknown_rows_and_models():
    with pytest.raises(SystemExit):
        speed.main(["--optimizers", "AdamWSNX"])
    with pytest.raises(SystemExit):
        speed.main(["--models", "llama_7b"])


def test_speed_rejects_a_device_it_cannot_time_on():
    with pytest.raises(SystemExit):
        speed.main(["--models", "llama_20m", "--device", "meta"])
    with pytest.raises(SystemExit):
        speed.main(["--models", "llama_20m", "--device", "gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            speed.main(["--models", "llama_20m", "--device", "cuda"])


def test_steps_on_cuda_are_timed_between_device_synchronisations(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    speed._synchronizer(torch.device("cuda", 0))()
    assert calls == [torch.device("cuda", 0)]
    speed._synchronizer(torch.device("cpu"))()
    assert len(calls) == 1


def test_llama_like_gives_the_same_gradients_on_any_device():
    a, b = speed.llama_like("llama_20m"), speed.llama_like("llama_20m", torch.device("cpu"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_the_gpu_check_script_asks_for_rows_the_benchmark_knows():
    import re

    from conftest import ROOT

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    (listed,) = re.findall(r'--optimizers "([^"]+)"', script)
    (models,) = re.findall(r"--models (\S+)", script)
    rows = [s.strip() for s in listed.split(",")]
    assert rows and set(rows) <= set(speed.configs(64, 200))
    assert set(models.split(",")) <= set(speed.SHAPES)


def test_compiled_adamw_row_is_torchs_adamw_with_its_step_compiled(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    model = torch.nn.Linear(3, 2)
    row = speed.configs(64, 200)["AdamW compiled"](model)
    assert isinstance(row, speed.Compiled) and type(row.opt) is torch.optim.AdamW
    assert row.opt.defaults["foreach"] is True and compiled == [row.opt.step]
    assert row.state is row.opt.state
    # each compiled row gets its own room in the cache of the step frame all optimizers share
    speed.configs(64, 200)["AdamWSN compiled"](model)
    assert torch._dynamo.config.recompile_limit == 24
