"""python -m snsm.bench.memory: the peak-memory breakdown, on the hidden tiny size (LLaMA-9M shapes, 1024 tokens).

One command-line run (real steps and fake-tensor estimates, each in its own worker process) feeds
most tests; a few check the helpers in this process.
"""
import json

import pytest
import torch
from torch import nn

import snsm
from snsm.bench import memory

OPTIMIZERS = ("adamw", "adamw-snsm", "galore")
#: the breakdown's categories add up to the tracker's peak within this share of it
SUM_TOLERANCE = 0.01
#: a fake-tensor estimate of the tiny model is within this share of the real tracker's peak
ESTIMATE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    mp = pytest.MonkeyPatch()
    # GaLore is reported as skipped whether or not galore-torch is installed here
    mp.setitem(memory.PEERS, "galore", "snsm_no_such_peer_module")
    try:
        status = memory.main(["--sizes", "tiny", "--real-sizes", "tiny", "--dtypes", "float32",
                              "--optimizers", ",".join(OPTIMIZERS), "--modes", "ordinary,in-backward",
                              "--seq-len", "128", "--jobs", "2", "--no-progress", "--out", str(out)])
    finally:
        mp.undo()
    assert status == 0
    return out, json.loads((out / "memory.json").read_text())


def _entry(result, optimizer, mode):
    [e] = [e for e in result["entries"] if e["optimizer"] == optimizer and e["mode"] == mode]
    return e


def test_cli_writes_json_md_png_with_every_requested_row(run):
    out, result = run
    keys = {(e["size"], e["dtype"], e["optimizer"], e["mode"]) for e in result["entries"]}
    assert keys == {("tiny", "float32", o, m) for o in OPTIMIZERS for m in memory.MODES}
    md = (out / "memory.md").read_text()
    for label in ("AdamW", "AdamW-SNSM", "GaLore"):
        assert f"| tiny | float32 | {label} | ordinary |" in md and f"| tiny | float32 | {label} | in-backward |" in md
    assert "Realized against arithmetic saving" in md and result["command"].startswith("python -m snsm.bench.memory")
    assert (out / "memory_tiny.png").stat().st_size > 0 and result["plots"] == ["memory_tiny.png"]
    for o in ("adamw", "adamw-snsm"):
        for m in memory.MODES:
            e = _entry(result, o, m)
            assert e["status"] == "ok" and e["method"] == "measured", e
            assert e["rss_step"] > 0 and e["peak"] > 0


def test_breakdown_sums_to_the_tracked_peak(run):
    _, result = run
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in rows} == {"measured", "estimated"}
    for r in rows:
        total = sum(r[c] for c in memory.CATEGORIES)
        assert abs(total - r["peak"]) <= SUM_TOLERANCE * r["peak"], r
        assert r["weights"] >= r["param_bytes"] and r["weights"] - r["param_bytes"] < 0.01 * r["param_bytes"]
        assert 0 < r["state"] and r["gradients"] <= r["gradient_bytes"]


def test_fake_estimate_matches_the_real_tracker(run):
    _, result = run
    checked = 0
    for o in ("adamw", "adamw-snsm"):
        for m in memory.MODES:
            e = _entry(result, o, m)
            assert e["estimate"] > 0
            assert abs(e["estimate_error"]) <= ESTIMATE_TOLERANCE, e
            checked += 1
    assert checked == 4 and result["estimate_errors"]["all"]["count"] == 4


def test_in_backward_holds_fewer_gradients_for_adamw_snsm(run):
    if not hasattr(snsm.AdamWSNSM, "step_in_backward"):
        pytest.skip("snsm has no step_in_backward yet")
    _, result = run
    ordinary, in_backward = _entry(result, "adamw-snsm", "ordinary"), _entry(result, "adamw-snsm", "in-backward")
    assert in_backward["in_backward_impl"] == "step_in_backward"
    assert in_backward["gradients_max"] < 0.5 * ordinary["gradients_max"]
    assert in_backward["gradients"] < ordinary["gradients"] or ordinary["gradients"] == 0
    assert in_backward["peak"] < ordinary["peak"]
    assert _entry(result, "adamw", "in-backward")["in_backward_impl"] == "per-parameter hooks"


def test_a_missing_peer_is_reported_as_skipped(run):
    out, result = run
    for m in memory.MODES:
        e = _entry(result, "galore", m)
        assert e["status"] == "skipped" and "snsm_no_such_peer_module" in e["reason"]
    assert "| tiny | float32 | GaLore | ordinary | skipped |" in (out / "memory.md").read_text()


def test_savings_compare_realized_with_arithmetic():
    def row(opt, mode, peak, state):
        return dict(size="1b", dtype="bf16", optimizer=opt, mode=mode, method="estimated", status="ok", peak=peak,
                    state=state, gradient_bytes=100)
    entries = [row("adamw", "ordinary", 1000, 400), row("adamw-f32", "ordinary", 1300, 800),
               row("adamw-snsm", "in-backward", 600, 150)]
    by = {s["baseline"]: s for s in memory.savings(entries)}
    assert by["adamw"]["realized"] == 400 and by["adamw"]["arithmetic"] == 350
    assert by["adamw-f32"]["realized"] == 700 and by["adamw-f32"]["arithmetic"] == 750
    assert by["adamw-f32"]["ratio"] == pytest.approx(700 / 750)
    assert [p["optimizer"] for p in memory.paper_rows(entries)][:2] == ["adamw", "adamw-f32"]


def test_per_parameter_steps_match_ordinary_steps_and_free_gradients():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    ordinary = torch.optim.AdamW(a.parameters(), lr=1e-2)
    hooked = memory.PerParameter(torch.optim.AdamW(b.parameters(), lr=1e-2))
    x = torch.randn(5, 8)
    for _ in range(3):
        a(x).square().sum().backward()
        ordinary.step()
        ordinary.zero_grad()
        b(x).square().sum().backward()
        assert all(p.grad is None for p in b.parameters())
        hooked.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert len(hooked.state) == 4
    hooked.remove()


def test_unknown_size_is_refused(tmp_path, capsys):
    assert memory.main(["--sizes", "7b", "--out", str(tmp_path)]) == 2
    assert "unknown size '7b'" in capsys.readouterr().err
