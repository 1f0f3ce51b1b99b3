"""The benchmark's clipping modes, steps inside backward and closure optimizers (snsm.bench):
``--clip {global,tensor,previous,none}``, ``--max-norm``, ``--in-backward``, ``--time-in-backward``
and ``opt.step(closure)`` with its gradient-evaluation count.

Most cases run one job in this process (:func:`snsm.bench.train.run_job`) on a synthetic token
stream and a tiny LLaMA (sequence 32, batch 4 in micro-batches of 2, 6 steps), so a job takes a few
seconds; one end-to-end command-line run checks that the flags reach the jobs and the summary.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark needs the [bench] extra (transformers)")
pytest.importorskip("tokenizers", reason="the benchmark needs the [bench] extra (tokenizers)")
pytest.importorskip("matplotlib", reason="the benchmark needs the [bench] extra (matplotlib)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import snsm  # noqa: E402
from snsm.bench import optimizers as bench_optimizers  # noqa: E402
from conftest import run_bench  # noqa: E402
from snsm.bench.cli import main  # noqa: E402
from snsm.bench.train import PerParameterSteps, Stepping, run_job, time_step_modes, train_step  # noqa: E402

VOCAB, SEQ = 300, 32


class _Quiet:
    def send(self, *args):
        pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from snsm.bench.model import build_model
    d = tmp_path_factory.mktemp("inbackward-data")
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", rng.integers(0, VOCAB, 20_000).astype(np.uint16))
    np.save(d / "val.npy", rng.integers(0, VOCAB, 4_000).astype(np.uint16))
    torch.save(build_model("llama_9m", VOCAB, SEQ, 0).state_dict(), d / "init.pt")
    return d


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _job(data: Path, out: Path, name: str, optimizer: str = "adamw-snsm", **kw) -> dict:
    job = {"model": "llama_9m", "vocab_size": VOCAB, "seq_len": SEQ, "batch_size": 4, "micro_batch": 2, "steps": 6,
           "eval_every": 3, "eval_seqs": 4, "eval_batch": 2, "ckpt_every": 100, "warmup_frac": 0.1,
           "min_lr_ratio": 0.1, "clip": 1.0, "rank": 8, "proj_gap": 3, "seed": 0,
           "train_tokens": str(data / "train.npy"), "val_tokens": str(data / "val.npy"),
           "init_path": str(data / "init.pt"), "device": "cpu", "threads": 1, "resume": False, "stop_after": None,
           "name": name, "optimizer": optimizer, "lr": 3e-3, "dir": str(out / name)}
    job.update(kw)
    Path(job["dir"]).mkdir(parents=True, exist_ok=True)
    return job


def _run(data, out, name, **kw) -> dict:
    job = _job(data, out, name, **kw)
    status = run_job(job, _Quiet())
    result = json.loads((Path(job["dir"]) / "result.json").read_text())
    assert status == result["status"]
    return result


def _losses(r: dict):
    return r["final_val_loss"], r["final_train_loss"], [v for _, v in r["curve"]]


def test_in_backward_equals_ordinary_steps_without_clipping(data, tmp_path, one_thread):
    """adamw-snsm with --clip none: steps inside backward (micro-batches through accumulating())
    give the ordinary run's losses bit for bit; so does --clip tensor (the same definition)."""
    for clip in ("none", "tensor"):
        ordinary = _run(data, tmp_path, f"ord-{clip}", clip_mode=clip)
        inside = _run(data, tmp_path, f"ib-{clip}", clip_mode=clip, in_backward=True)
        assert ordinary["status"] == inside["status"] == "done"
        assert _losses(inside) == _losses(ordinary), clip
        assert inside["in_backward"] and not ordinary["in_backward"] and inside["clip_mode"] == clip
        assert inside["optimizer_step_time_s"] is None and ordinary["optimizer_step_time_s"] > 0
        assert inside["grad_evals"] == 6 and inside["grad_evals_per_step"] == 1


def test_clip_modes_in_backward_run_and_differ_from_none(data, tmp_path, one_thread):
    none = _run(data, tmp_path, "none", clip_mode="none", in_backward=True)
    finals = {"none": none["final_val_loss"]}
    for clip in ("tensor", "previous"):
        r = _run(data, tmp_path, clip, clip_mode=clip, in_backward=True)
        assert r["status"] == "done" and np.isfinite(r["final_val_loss"])
        finals[clip] = r["final_val_loss"]
        assert r["final_val_loss"] != none["final_val_loss"], clip
    # the ordinary run with the same 'previous' definition lands within float rounding of it
    ordinary = _run(data, tmp_path, "ord-previous", clip_mode="previous")
    assert abs(ordinary["final_val_loss"] - finals["previous"]) < 1e-4
    assert len(set(finals.values())) == 3


def test_adamw_in_backward_per_parameter_fused_copies(data, tmp_path, one_thread):
    """torch AdamW inside backward (one fused AdamW per parameter, the job's AdamW keeping the state and
    the schedule) follows the ordinary AdamW run to float rounding."""
    ordinary = _run(data, tmp_path, "adamw-ord", optimizer="adamw", clip_mode="none")
    inside = _run(data, tmp_path, "adamw-ib", optimizer="adamw", clip_mode="none", in_backward=True)
    assert inside["status"] == "done"
    assert abs(inside["final_val_loss"] - ordinary["final_val_loss"]) < 1e-5
    assert inside["state_bytes"] == ordinary["state_bytes"]


def test_per_parameter_steps_under_accumulation_free_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = PerParameterSteps(opt)
    steps.start(clip=None)
    x = torch.randn(4, 6)
    with steps.accumulating():
        model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters()) and not opt.state
    model(x).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 4 and all(int(s["step"]) == 1 for s in opt.state.values())


def test_resume_in_backward_and_ordinary_previous_is_exact(data, tmp_path, one_thread):
    """A job stopped after 3 steps and resumed ends where the uninterrupted one ends: in backward
    (clip tensor, and clip previous with the handle's factor in the checkpoint) and with ordinary steps
    clipped by the previous step's factor (kept in the checkpoint)."""
    for name, kw in (("tensor-ib", {"clip_mode": "tensor", "in_backward": True}),
                     ("previous-ib", {"clip_mode": "previous", "in_backward": True}),
                     ("previous-ord", {"clip_mode": "previous"})):
        full = _run(data, tmp_path / "full", name, **kw)
        job = _job(data, tmp_path / "cut", name, ckpt_every=3, stop_after=3, **kw)
        assert run_job(job, _Quiet()) == "stopped"
        resumed = _run(data, tmp_path / "cut", name, ckpt_every=3, resume=True, **kw)
        assert _losses(resumed) == _losses(full), name


def _closure_optimizer_name(monkeypatch) -> str:
    """A registry entry that builds snsm.MetaSTORM, or a test-only one."""
    for name, spec in bench_optimizers.REGISTRY.items():
        if "storm" in name.lower() or "MetaSTORM" in spec.description:
            return name
    spec = bench_optimizers.OptimizerSpec("test-metastorm", "snsm.MetaSTORM (test-only entry)",
                                          lambda m, lr, ctx: snsm.MetaSTORM(m.parameters(), lr=lr))
    monkeypatch.setitem(bench_optimizers.REGISTRY, spec.name, spec)
    return spec.name


def test_metastorm_steps_with_a_closure_and_counts_two_gradient_evaluations(data, tmp_path, monkeypatch, one_thread):
    name = _closure_optimizer_name(monkeypatch)
    r = _run(data, tmp_path, "storm", optimizer=name, lr=0.05)
    assert r["status"] == "done", r.get("reason")
    assert r["needs_closure"] and np.isfinite(r["final_val_loss"])
    # the closure at the current iterate every step, and at the previous one from the second step on
    assert r["grad_evals"] == 2 * r["steps"] - 1
    assert r["optimizer_step_time_s"] is not None and r["optimizer_step_time_s"] < r["step_time_s"]
    skipped = _run(data, tmp_path, "storm-ib", optimizer=name, lr=0.05, clip_mode="none", in_backward=True)
    assert skipped["status"] == "skipped" and "cannot step inside backward" in skipped["reason"]


def test_train_step_calls_the_closure_twice_per_step():
    torch.manual_seed(0)
    from snsm.bench.model import build_model
    model = build_model("llama_9m", VOCAB, 8, 0)
    opt = snsm.MetaSTORM(model.parameters(), lr=0.01)
    stepping = Stepping("global", 1.0)
    stepping.start(opt)
    block = torch.randint(0, VOCAB, (2, 9))
    evals = [train_step(model, opt, block, 1, stepping, torch.device("cpu"))[3] for _ in range(3)]
    assert evals == [1, 2, 2]


def test_time_step_modes_alternates_and_matches_without_clipping(data, tmp_path, one_thread):
    r = time_step_modes(_job(data, tmp_path, "t", clip_mode="none"), steps=2, warmup=1)
    assert r["max_param_diff"] == 0.0
    assert r["wall_s"]["ordinary"]["n"] == r["wall_s"]["in_backward"]["n"] == 2
    assert r["wall_ratio"]["median_of_rounds"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--in-backward"], "--in-backward cannot clip by the global norm (the default --clip)"),
    (["--in-backward", "--clip", "global"], "use --clip tensor, --clip previous or --clip none"),
    (["--clip", "none", "--max-norm", "2"], "--max-norm has no effect with --clip none"),
    (["--clip", "tensor", "--max-norm", "0"], "--max-norm must be > 0"),
    (["--time-in-backward", "5"], "add --clip tensor, --clip previous or --clip none"),
    (["--time-in-backward", "5", "--clip", "none", "--resume"], "--time-in-backward runs alone: drop --resume"),
    (["--in-backward", "--clip", "tensor", "--optimizers", "adagrad-sn+adaptive"], "the adaptive batch size"),
])
def test_bad_stepping_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o" / "config.json").exists()


def test_command_line_in_backward_run(tmp_path):
    """--in-backward --clip previous reaches the jobs and the summary; a peer that cannot step in
    backward is reported as skipped, not failed (exit 0)."""
    tiny = ["--preset", "smoke", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "2", "--steps", "4",
            "--eval-every", "2", "--eval-seqs", "4", "--vocab-size", "512", "--workers", "2", "--no-progress", "-q",
            "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "run"
    proc = run_bench(*tiny, "--optimizers", "adamw-snsm,adafactor", "--in-backward", "--clip", "previous",
              "--max-norm", "0.5", "--out", str(out))  # fails on a non-zero exit, with its stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["in_backward"] and s["clip_mode"] == "previous" and s["clip"] == 0.5
    by = {o["name"]: o for o in s["optimizers"]}
    assert by["adamw-snsm"]["in_backward"] and np.isfinite(by["adamw-snsm"]["final_val_loss"])
    assert by["adafactor"]["skipped"] and "cannot step inside backward" in by["adafactor"]["reason"]
    assert json.loads((out / "config.json").read_text())["stepping"] == {"clip_mode": "previous", "in_backward": True}
    assert "stepped inside backward" in proc.stdout
