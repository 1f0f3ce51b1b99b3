"""The pretraining benchmark (snsm.bench): end to end on a tiny configuration, the summary
schema, resume after a stop and after a kill, tokens-to-match, and one-line errors.

The end-to-end runs use the smoke preset shrunk further (sequence 64, a dozen steps) so the
whole file stays well under three minutes on two cores; `python -m snsm.bench --preset smoke`
itself is what the acceptance check runs.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark needs the [bench] extra (transformers)")
pytest.importorskip("tokenizers", reason="the benchmark needs the [bench] extra (tokenizers)")
pytest.importorskip("matplotlib", reason="the benchmark needs the [bench] extra (matplotlib)")

from snsm.bench import BenchError  # noqa: E402
from snsm.bench.cli import main  # noqa: E402
from snsm.bench.optimizers import REGISTRY, lr_config  # noqa: E402
from snsm.bench.presets import PRESETS  # noqa: E402
from snsm.bench.report import REQUIRED, build_summary, tokens_to_match  # noqa: E402
from conftest import bench_env, run_bench as bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ["adamw", "adamw-sn", "adamw-snsm"]
try:
    import galore_torch  # noqa: F401
    OPTIMIZERS.append("galore")  # its projector object must survive the checkpoint too
except Exception:
    pass
TINY = ["--preset", "smoke", "--seq-len", "64", "--batch-size", "4", "--steps", "12", "--eval-every", "4",
        "--eval-seqs", "8", "--ckpt-every", "3", "--vocab-size", "512", "--workers", "2", "--no-progress",
        "--optimizers", ",".join(OPTIMIZERS)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("bench-full")
    proc = bench(*TINY, "--out", str(out), "--cache-dir", str(cache))
    return out, proc


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _by_name(summary: dict) -> dict:
    return {o["name"]: o for o in summary["optimizers"]}


def test_end_to_end_outputs_and_schema(full_run):
    out, proc = full_run
    s = _summary(out)
    for key in ("preset", "model", "n_params", "tokens", "seed", "device", "torch_version"):
        assert key in s, key
    assert s["preset"] == "smoke" and s["model"] == "llama_9m" and s["device"] == "cpu"
    assert s["tokens"] == 12 * 4 * 64
    opts = _by_name(s)
    assert list(opts) == OPTIMIZERS
    for name, o in opts.items():
        assert not o["skipped"], (name, o.get("reason"))
        for k in REQUIRED:
            assert k in o, (name, k)
        assert math.isfinite(o["final_val_loss"]) and o["final_val_ppl"] == pytest.approx(math.exp(o["final_val_loss"]))
        assert [c[0] for c in o["curve"]] == [0, 1024, 2048, 3072]  # step 0, every 4 steps, the end
        assert o["curve"][-1][1] == o["final_val_loss"]
        assert o["curve"][-1][1] < o["curve"][0][1]  # it learned something
        assert o["state_bytes"] > 0 and o["peak_bytes"] > 0 and o["peak_tensor_bytes"] > 0
        assert o["tokens_per_s"] > 0 and o["step_time_ratio_vs_adamw"] > 0
        # optimizer.step() alone: a positive part of the whole training step, on the same clock
        assert 0 < o["optimizer_step_time_s"] < o["step_time_s"], name
        assert 0 < o["optimizer_step_wall_s"] < o["step_wall_s"], name
        assert o["optimizer_step_ratio_vs_adamw"] > 0
        assert (out / name / "curve.csv").read_text().startswith("tokens,val_loss\n")
    assert opts["adamw"]["tokens_to_match_adamw"] <= s["tokens"]
    assert opts["adamw"]["step_time_ratio_vs_adamw"] == 1.0 and opts["adamw"]["optimizer_step_ratio_vs_adamw"] == 1.0
    assert opts["adamw-snsm"]["state_bytes"] < opts["adamw-sn"]["state_bytes"] < opts["adamw"]["state_bytes"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| adamw-snsm |" in md and "loss.png" in md
    assert "| adamw |" in proc.stdout  # the table is printed at the end
    for table in (md, proc.stdout):  # the training step's column and the optimizer step's beside it
        head = next(line for line in table.splitlines() if line.startswith("| optimizer |"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        assert cols[-2:] == ["train step vs AdamW", "opt step vs AdamW"]
        row = next(line for line in table.splitlines() if line.startswith("| adamw-snsm |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(cols)
        assert float(cells[-1]) == pytest.approx(opts["adamw-snsm"]["optimizer_step_ratio_vs_adamw"], abs=0.006)
    # the tokenizer is reusable as a transformers fast tokenizer
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    assert tok.decode(tok("It is a truth universally acknowledged")["input_ids"]) == "It is a truth universally acknowledged"
    # the checkpoint loads with weights_only=True
    import torch
    ck = torch.load(out / "adamw-snsm" / "checkpoint.pt", weights_only=True)
    assert ck["data"]["step"] == 12 and ck["optimizer"]["state"]


def _curves(out: Path) -> dict:
    return {n: o["curve"] for n, o in _by_name(_summary(out)).items()}


def test_resume_after_stop_and_after_kill_matches_uninterrupted(full_run, tmp_path, cache):
    ref_out, _ = full_run
    out = tmp_path / "run"
    common = [*TINY, "--out", str(out), "--cache-dir", str(cache)]
    # 1. a clean stop part-way (leaves a checkpoint at step 5, off the checkpoint grid)
    proc = bench(*common, "--stop-after", "5")
    assert "--resume" in proc.stderr and not (out / "summary.json").exists()
    for name in OPTIMIZERS:
        assert not (out / name / "result.json").exists()
    # 2. resume, and kill the whole process group (workers included) as soon as a job checkpoints again
    marks = {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in OPTIMIZERS}
    p = subprocess.Popen([sys.executable, "-m", "snsm.bench", *common, "--resume"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=bench_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if any((out / n / "checkpoint.pt").stat().st_mtime_ns != marks[n] for n in OPTIMIZERS):
                break
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    killed = [n for n in OPTIMIZERS if not (out / n / "result.json").exists()]
    assert killed, "every job finished before the kill; the test did not interrupt anything"
    # 3. resume to the end: the same curves, bit for bit, as the uninterrupted run
    bench(*common, "--resume")
    assert _curves(out) == _curves(ref_out)
    # the timings span the whole run: steps 2.. of every invocation, carried by the checkpoints
    import torch
    for name, o in _by_name(_summary(out)).items():
        run = torch.load(out / name / "checkpoint.pt", weights_only=True)["run"]
        assert run["opt_timed_steps"] == run["timed_steps"] == 12 - 2, name
        assert 0 < o["optimizer_step_time_s"] < o["step_time_s"], name


def test_resume_refuses_other_settings(full_run, cache):
    out, _ = full_run
    args = [a if a != "12" else "13" for a in TINY]
    proc = bench(*args, "--out", str(out), "--cache-dir", str(cache), "--resume", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "different settings" in proc.stderr


def test_tokens_to_match():
    curve = [[0, 9.0], [100, 6.0], [200, 5.0], [300, 4.5]]
    assert tokens_to_match(curve, 5.0) == 200  # <= counts
    assert tokens_to_match(curve, 5.5) == 200
    assert tokens_to_match(curve, 9.5) == 0
    assert tokens_to_match(curve, 4.0) is None  # never
    assert tokens_to_match(curve, None) is None
    assert tokens_to_match([], 5.0) is None
    assert tokens_to_match([[0, 9.0], [100, float("nan")], [200, 4.0]], 5.0) == 200


def test_summary_relative_columns_and_skipped_peers():
    meta = {"preset": "x"}
    results = [
        {"name": "adamw", "optimizer": "adamw", "lr": 1e-3, "status": "done", "final_val_loss": 5.0,
         "final_val_ppl": math.exp(5), "state_bytes": 100, "step_time_s": 2.0, "optimizer_step_time_s": 0.1,
         "tokens": 300,
         "peak_rss_delta_bytes": 10, "peak_cuda_bytes": None, "tokens_per_s": 1.0,
         "curve": [[0, 9.0], [150, 6.0], [300, 5.0]]},
        {"name": "fast", "optimizer": "adamw-snsm", "lr": 1e-2, "status": "done", "final_val_loss": 4.0,
         "final_val_ppl": math.exp(4), "state_bytes": 20, "step_time_s": 3.0, "optimizer_step_time_s": 0.25,
         "tokens": 300,
         "peak_rss_delta_bytes": 5, "peak_cuda_bytes": None, "tokens_per_s": 1.0,
         "curve": [[0, 9.0], [150, 4.9], [300, 4.0]]},
        {"name": "adam-mini", "optimizer": "adam-mini", "lr": 1e-3, "status": "skipped", "skipped": True,
         "reason": "adam-mini not importable: ModuleNotFoundError"},
    ]
    s = build_summary(meta, results)
    o = _by_name(s)
    assert s["adamw_final_val_loss"] == 5.0
    assert o["adamw"]["tokens_to_match_adamw"] == 300 and o["fast"]["tokens_to_match_adamw"] == 150
    assert o["fast"]["step_time_ratio_vs_adamw"] == 1.5 and o["fast"]["state_ratio_vs_adamw"] == 0.2
    assert o["fast"]["optimizer_step_ratio_vs_adamw"] == pytest.approx(2.5)
    assert o["fast"]["peak_bytes"] == 5
    assert o["adam-mini"]["skipped"] and "not importable" in o["adam-mini"]["reason"]
    assert all(k in o["adam-mini"] for k in REQUIRED)
    # without AdamW in the run there is no reference
    s = build_summary(meta, results[1:])
    assert _by_name(s)["fast"]["tokens_to_match_adamw"] is None


def test_batches_are_deterministic_and_cover_every_block():
    import numpy as np
    from snsm.bench.textdata import Batches
    tokens = np.arange(1001, dtype=np.uint16)
    a, b = Batches(tokens, 10, 4, seed=3), Batches(tokens, 10, 4, seed=3)
    seen = []
    for step in range(50):  # two epochs of 100 blocks
        x = a.batch(step)
        assert x.shape == (4, 11) and (x == b.batch(step)).all()
        assert (x[:, 1:] == x[:, :-1] + 1).all()  # contiguous blocks, targets shifted by one
        seen.extend((x[:, 0] // 10).tolist())
    assert sorted(seen[:100]) == list(range(100)) and sorted(seen[100:]) == list(range(100))
    assert seen[:100] != seen[100:]  # a fresh order each epoch
    assert not (Batches(tokens, 10, 4, seed=4).batch(0) == a.batch(0)).all()


def test_lr_config_covers_every_optimizer_and_records_its_command():
    cfg = lr_config()
    for table in {p.lr_table for p in PRESETS.values()}:
        assert set(cfg[table]["lr"]) == set(REGISTRY), table
        assert "command" in cfg[table]
    assert "--sweep lr" in cfg["default"]["command"]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'"),
    (["--data-files", "/nonexistent/corpus.txt", "--preset", "smoke"], "data path not found"),
    (["--preset", "smoke", "--steps", "5", "--eval-every", "10"], "budget too small to evaluate"),
    (["--preset", "smoke", "--steps", "0"], "must be >= 1"),
    (["--nproc", "2"], "needs --parallel ddp or --parallel fsdp"),
    (["--preset", "smoke", "--bogus-flag"], "unrecognized arguments"),
    (["--resume", "--out", "/nonexistent-snsm-run"], "no run to resume"),
])
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("snsm-bench: error:") and message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = bench("--optimizers", "adamw,sgd", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("snsm-bench: error: unknown optimizer 'sgd'; choose from "
                                   + ", ".join(REGISTRY))


def test_local_data_files(tmp_path, cache):
    text = "\n\n".join(f"Paragraph {i}. " + "the quick brown fox jumps over the lazy dog. " * 20
                       for i in range(120))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Line {i} " * 50}) for i in range(40)))
    from snsm.bench.textdata import file_documents
    train, val, desc = file_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert len(train) + len(val) == 160 and val and "2 local file(s)" == desc
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(BenchError, match="unsupported data file type"):
        file_documents([str(tmp_path / "c.csv")])


def test_streamed_dataset_without_network(monkeypatch):
    import types
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "broken":
            raise ConnectionError("no route to host\nmore detail")
        if split == "validation":
            raise ValueError("Bad split: validation")
        return iter([{"text": f"document number {i} " * 10} for i in range(500)] + [{"text": ""}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    from snsm.bench.textdata import StreamedDataset, take_chars
    src = StreamedDataset("someone/corpus:en")
    assert (src.name, src.config) == ("someone/corpus", "en")
    train, val = list(src.train_texts()), src.val_texts(10**9)
    assert len(train) + len(val) == 500 and val and not set(train) & set(val)  # hash split, no overlap
    assert all(c[3] for c in calls)  # always streaming
    assert len(take_chars(src.train_texts(), 1000)) < 10  # reads only what it needs
    with pytest.raises(BenchError, match="could not read dataset broken.*ConnectionError: no route to host$"):
        list(StreamedDataset("broken").train_texts())


# --- the AdaGrad family, Muon, and the adaptive batch size (issue 7) ---------------------------

FAMILY = ["adagrad-norm", "adagrad-sn", "adago", "muon"]


@pytest.fixture
def one_thread():
    """One intra-op thread, as in the benchmark's workers (bf16 Newton-Schulz with 2 threads on a
    busy 2-core machine can be 10x slower)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model(seed=0):
    from snsm.bench.model import build_model
    return build_model("llama_9m", 300, 16, seed)


def _ctx(aux_lr=None):
    from snsm.bench.optimizers import BuildContext
    return BuildContext(rank=8, proj_gap=5, hidden=128, heads=4, seed=0, aux_lr=aux_lr)


def _steps(model, opt, sched, n, seed=0):
    import torch
    from snsm.bench.model import lm_loss
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        block = torch.randint(0, 300, (2, 17), generator=g)
        loss = lm_loss(model, block)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", FAMILY + ["adagrad-norm+adaptive", "adagrad-sn+adaptive"])
def test_family_entries_build_and_step(name, one_thread):
    import torch
    from snsm.bench.optimizers import state_bytes
    from snsm.bench.train import cosine_with_warmup
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    spec = REGISTRY[name]
    aux = lr_config()["default"]["lr"][spec.aux_lr_from] if spec.aux_lr_from else None
    opt = spec.build(model, lr_config()["default"]["lr"][name], _ctx(aux))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(10, 0.1, 0.1))
    losses = _steps(model, opt, sched, 3)
    assert all(math.isfinite(x) for x in losses)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every parameter moved
    assert state_bytes(opt) > 0
    if spec.aux_lr_from:  # the non-matrix group runs at its own lr, scheduled like the rest
        lrs = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([lrs[0]] * len(lrs))
        assert opt.param_groups[-1]["initial_lr"] == aux
    if name == "adagrad-norm":  # one accumulator per linear weight
        w = model.model.layers[0].mlp.up_proj.weight
        assert opt.state[w]["exp_avg_sq"].numel() == 1


def test_muon_wrapper_round_trips_with_weights_only_and_resumes_exactly(tmp_path, one_thread):
    import torch
    from torch import nn
    from snsm.bench.checkpoint import export_state, import_state
    from snsm.bench.optimizers import MuonWithAdamW, state_bytes
    from snsm.bench.train import cosine_with_warmup

    def make():
        model = _tiny_model()
        opt = REGISTRY["muon"].build(model, 0.02, _ctx(3e-3))
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(8, 0.25, 0.1))

    model, opt, sched = make()
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    assert isinstance(opt.adamw, torch.optim.AdamW)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for g in opt.muon.param_groups for p in g["params"]} == linear
    assert opt.muon.defaults["nesterov"] and opt.muon.defaults["momentum"] == 0.95
    assert opt.muon.defaults["weight_decay"] == 0.0 and opt.adamw.defaults["weight_decay"] == 0.0
    assert len({id(p) for g in opt.param_groups for p in g["params"]}) == len(list(model.parameters()))
    _steps(model, opt, sched, 3)
    # state covers both children: Muon's momentum buffers and AdamW's two moments
    n_muon = sum(p.numel() for p in opt.muon.param_groups[0]["params"])
    n_adam = sum(p.numel() for g in opt.adamw.param_groups for p in g["params"])
    assert state_bytes(opt) >= 4 * (n_muon + 2 * n_adam)
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": export_state(opt), "scheduler": sched.state_dict()}, ck)
    loaded = torch.load(ck, weights_only=True)
    assert sorted(loaded["optimizer"]["state"]) == list(range(len(list(model.parameters()))))
    ref = _steps(model, opt, sched, 3, seed=1)

    model2, opt2, sched2 = make()
    model2.load_state_dict(loaded["model"])
    import_state(opt2, loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in loaded["optimizer"]["param_groups"]]
    assert _steps(model2, opt2, sched2, 3, seed=1) == ref
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parameter groups"):
        opt2.load_state_dict({"state": {}, "param_groups": loaded["optimizer"]["param_groups"][:1]})


ADAPTIVE_TINY = [a if a != ",".join(OPTIMIZERS) else "muon,adagrad-sn+adaptive" for a in TINY]
ADAPTIVE_TINY += ["--batch-eta", "0.02", "--max-batch-size", "12"]  # a small eta: the batch surely grows


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("bench-adaptive")
    bench(*ADAPTIVE_TINY, "--out", str(out), "--cache-dir", str(cache))
    return out


def test_adaptive_batch_grows_never_shrinks_and_keeps_the_token_budget(adaptive_run):
    s = _summary(adaptive_run)
    o = _by_name(s)
    budget = 12 * 4 * 64
    assert s["tokens"] == budget and s["adaptive_batch"]["max_batch_size"] == 12
    a = o["adagrad-sn+adaptive"]
    assert not a["skipped"] and a["batch_schedule"] == "adaptive" and a["micro_batch"] == 1
    assert a["tokens"] == budget  # the same budget as the fixed run, to the token
    assert a["steps"] < 12  # bigger batches, fewer steps
    hist = a["batch_history"]
    sizes = [b for _, _, b in hist]
    assert sizes[0] == 4 and max(sizes) > 4 and max(sizes) <= 12
    # never shrinks (the last batch may be cut to what is left of the budget)
    assert sizes[:-1] == sorted(sizes[:-1]) and (len(sizes) < 2 or sizes[-1] <= sizes[-2])
    assert [st for st, _, _ in hist] == sorted(st for st, _, _ in hist) and hist[0][:2] == [0, 0]
    # curve by tokens: evaluated at 0, at the first step past every 4 x 4 x 64 tokens, and at the budget
    ticks = [t for t, _ in a["curve"]]
    assert ticks[0] == 0 and ticks[-1] == budget and ticks == sorted(set(ticks))
    assert a["final_val_loss"] < a["curve"][0][1]
    # step_time_s is per batch_size x seq_len tokens; the training and optimizer steps per optimizer step
    assert 0 < a["optimizer_step_time_s"] < a["train_step_time_s"] and a["step_time_s"] > 0
    assert o["muon"]["batch_schedule"] == "fixed" and o["muon"]["steps"] == 12
    md = (adaptive_run / "results.md").read_text()
    assert "`adagrad-sn+adaptive`:" in md and "optimizer steps" in md


def test_adaptive_batch_resume_is_exact(adaptive_run, tmp_path, cache):
    import torch
    out = tmp_path / "run"
    common = [*ADAPTIVE_TINY, "--out", str(out), "--cache-dir", str(cache)]
    bench(*common, "--stop-after", "2")
    ck = torch.load(out / "adagrad-sn+adaptive" / "checkpoint.pt", weights_only=True)
    assert ck["run"]["step"] == 2 and ck["batch"]["steps"] == 2 and ck["run"]["tokens"] > 0
    ck = torch.load(out / "muon" / "checkpoint.pt", weights_only=True)
    assert ck["optimizer"]["state"] and ck["run"]["step"] == 2
    bench(*common, "--resume")
    ref, got = _by_name(_summary(adaptive_run)), _by_name(_summary(out))
    for name in ("muon", "adagrad-sn+adaptive"):
        assert got[name]["curve"] == ref[name]["curve"], name
    assert got["adagrad-sn+adaptive"]["batch_history"] == ref["adagrad-sn+adaptive"]["batch_history"]


# --- the projector refresh: schedule and basis (issue 5) --------------------------------------

@pytest.mark.parametrize("name, proj, synchronized", [
    ("adamw-snsm", "svd", False),
    ("adamw-snsm-sync", "svd", True),
    ("adamw-snsm-randomized", "randomized", False),
    ("adamw-snsm-srht", "srht", False),
])
def test_refresh_entries_take_their_projector_and_schedule(name, proj, synchronized, one_thread):
    import torch
    from snsm.bench.train import cosine_with_warmup
    model = _tiny_model()
    opt = REGISTRY[name].build(model, lr_config()["default"]["lr"][name], _ctx())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(10, 0.1, 0.1))
    matrices = opt.param_groups[0]
    assert matrices["proj"] == proj and matrices["rank"] == 8 and matrices["proj_gap"] == 5
    assert lr_config()["default"]["lr"][name] == lr_config()["default"]["lr"]["adamw-snsm"]
    losses = _steps(model, opt, sched, 9)
    assert all(math.isfinite(x) for x in losses)
    # the step each matrix's basis was last computed at: one step for all when synchronized
    refreshed = {int(opt.state[p]["proj_step"]) for p in matrices["params"] if "proj" in opt.state[p]}
    assert len(matrices["params"]) > 10 and refreshed
    assert (refreshed == {5}) if synchronized else (len(refreshed) > 2)
    assert set(PRESETS["refresh"].optimizers) >= {"adamw", "adamw-snsm", name}


def test_batch_schedule_option_applies_to_every_entry():
    from snsm.bench.cli import adaptive_settings, build_parser, resolve_preset
    args = build_parser().parse_args(["--preset", "default", "--batch-schedule", "adaptive"])
    preset = resolve_preset(args)
    assert adaptive_settings(args, preset, ["adamw"]) == {"batch_schedule": "adaptive", "max_batch_size": 32,
                                                           "batch_eta": 0.75, "micro_batch": 2}
    args = build_parser().parse_args(["--preset", "default"])
    assert adaptive_settings(args, preset, ["adamw", "muon"]) is None
    assert adaptive_settings(args, preset, ["adagrad-norm+adaptive"])["batch_schedule"] == "fixed"
    assert set(PRESETS["family"].optimizers) >= set(FAMILY) | {"adamw", "adagrad-norm+adaptive",
                                                               "adagrad-sn+adaptive"}
    assert not set(PRESETS["default"].optimizers) & set(FAMILY)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "smoke", "--optimizers", "adagrad-sn+adaptive", "--max-batch-size", "4"], "must be >= --batch-size"),
    (["--preset", "smoke", "--optimizers", "adagrad-sn+adaptive", "--max-batch-size", "18", "--micro-batch", "4"],
     "multiple of the micro-batch"),
    (["--preset", "smoke", "--max-batch-size", "64"], "need --batch-schedule adaptive"),
    (["--preset", "smoke", "--batch-schedule", "adaptive", "--batch-size", "4", "--micro-batch", "4"],
     "needs >= 2 micro-batches"),
    (["--preset", "smoke", "--batch-schedule", "adaptive", "--batch-eta", "0"], "--batch-eta must be > 0"),
    (["--preset", "smoke", "--lr", "nosuch=0.1"], "--lr expects NAME=LR with a known optimizer name"),
    (["--preset", "smoke", "--lr", "adamw=x"], "'x' is not a number"),
    (["--preset", "smoke", "--lr", "adamw=0"], "the learning rate must be > 0"),
])
def test_adaptive_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snsm-bench: error:") and message in err and err.strip().count("\n") == 0


def test_adago_entries_hold_their_orthogonalized_groups_at_the_peak_lr_in_the_scheduler_itself():
    """AdaGO's paper steps with a constant eta: the LR scheduler leaves its orthogonalized groups at
    their peak (so steps inside backward, which run no opt.step() hook, see it too) and drives only
    its AdamW group; an entry without constant_lr follows the schedule in every group."""
    import torch
    from snsm.bench.optimizers import REGISTRY, BuildContext, orthogonalized
    from snsm.bench.train import lr_schedule

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ctx = BuildContext(rank=2, proj_gap=5, hidden=8, heads=2, aux_lr=1e-3)
    factor = lambda step: 0.5 ** step  # noqa: E731
    for name in ("adago", "adago-sm"):
        opt = REGISTRY[name].build(model, 0.2, ctx)
        sched = lr_schedule(opt, name, factor)
        held = [g for g in opt.param_groups if orthogonalized(g)]
        driven = [g for g in opt.param_groups if not orthogonalized(g)]
        assert held and driven
        for _ in range(3):
            sched.step()
        assert all(g["lr"] == 0.2 for g in held)
        assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.125) for g in driven)
    opt = REGISTRY["adamw-sn"].build(model, 0.2, ctx)
    sched = lr_schedule(opt, "adamw-sn", factor)
    sched.step()
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.5) for g in opt.param_groups)
