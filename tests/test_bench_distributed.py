"""The benchmark's distributed jobs: ``python -m snsm.bench --nproc 2 --parallel ddp|fsdp``
(gloo, 2 CPU processes per job) on the smoke preset shrunk to a few steps.

The honest check that each rank reads the right share of every batch: a 2-process DDP run
(same global batch) reproduces the one-process training losses and validation curve to
float rounding. An FSDP2 job stopped part-way and resumed from its torch.distributed.checkpoint
directory reproduces them too (to the rounding of sharded reductions); bit for bit the
uninterrupted FSDP job (slow). About 75 s on two cores.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("transformers", reason="the benchmark needs the [bench] extra (transformers)")
pytest.importorskip("tokenizers", reason="the benchmark needs the [bench] extra (tokenizers)")
pytest.importorskip("matplotlib", reason="the benchmark needs the [bench] extra (matplotlib)")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

from snsm.bench.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 6 steps of 4 sequences; 9 validation sequences: uneven shares (5 + 4) over 2 ranks
TINY = ["--preset", "smoke", "--seq-len", "64", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
        "--eval-seqs", "9", "--ckpt-every", "3", "--vocab-size", "512", "--no-progress"]


def bench(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "snsm.bench", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"snsm.bench {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def results(out: Path) -> dict:
    return {o["name"]: o for o in json.loads((out / "summary.json").read_text())["optimizers"]}


def train_losses(out: Path, name: str) -> list[float]:
    import torch
    return torch.load(out / name / "checkpoint.pt", weights_only=True)["run"]["train_loss"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-dist-cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("one-process")
    bench(*TINY, "--optimizers", "adamw,adamw-snsm", "--workers", "2", "--out", str(out), "--cache-dir", str(cache))
    return out


def test_ddp_matches_one_process(one_process, tmp_path, cache):
    out = tmp_path / "ddp"
    proc = bench(*TINY, "--optimizers", "adamw", "--nproc", "2", "--parallel", "ddp", "--out", str(out),
                 "--cache-dir", str(cache))
    got, ref = results(out)["adamw"], results(one_process)["adamw"]
    assert not got["skipped"] and (got["nproc"], got["parallel"], got["backend"]) == (2, "ddp", "gloo")
    assert all(math.isfinite(v) for _, v in got["curve"])
    assert 0 < got["optimizer_step_time_s"] < got["step_time_s"]  # rank 0's wall time, both
    # same global batch, same tokens, same evaluation points
    assert [t for t, _ in got["curve"]] == [t for t, _ in ref["curve"]] == [0, 768, 1536]
    assert [v for _, v in got["curve"]] == pytest.approx([v for _, v in ref["curve"]], rel=1e-6)
    assert train_losses(out, "adamw") == pytest.approx(train_losses(one_process, "adamw"), rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["nproc"], summary["parallel"], summary["tokens"]) == (2, "ddp", 6 * 4 * 64)
    assert "2-process ddp run" in (out / "results.md").read_text() and "2-process ddp run" in proc.stdout
    assert (out / "adamw" / "worker-rank1.log").exists()


FSDP = [*TINY, "--optimizers", "adamw-snsm", "--nproc", "2", "--parallel", "fsdp"]


@pytest.fixture(scope="module")
def fsdp_resumed(tmp_path_factory, cache):
    """An FSDP job stopped after 4 steps (a checkpoint off the grid) and resumed to the end."""
    out = tmp_path_factory.mktemp("fsdp-resumed")
    bench(*FSDP, "--out", str(out), "--cache-dir", str(cache), "--stop-after", "4")
    assert not (out / "summary.json").exists() and (out / "adamw-snsm" / "dcp-step4").is_dir()
    bench(*FSDP, "--out", str(out), "--cache-dir", str(cache), "--resume")
    return out


def test_fsdp_stopped_and_resumed_matches_one_process(fsdp_resumed, one_process):
    got, ref = results(fsdp_resumed)["adamw-snsm"], results(one_process)["adamw-snsm"]
    assert not got["skipped"] and (got["nproc"], got["parallel"]) == (2, "fsdp")
    assert got["state_bytes"] < ref["state_bytes"]  # rank 0 holds half of the row-sharded state
    assert [t for t, _ in got["curve"]] == [t for t, _ in ref["curve"]]
    # a wrong data position or schedule after the resume would be off by far more than rounding
    assert [v for _, v in got["curve"]] == pytest.approx([v for _, v in ref["curve"]], rel=1e-4)
    assert train_losses(fsdp_resumed, "adamw-snsm") == pytest.approx(train_losses(one_process, "adamw-snsm"),
                                                                     rel=1e-4)
    assert [p.name for p in (fsdp_resumed / "adamw-snsm").glob("dcp-step*")] == ["dcp-step6"]
    assert "2-process fsdp run" in (fsdp_resumed / "results.md").read_text()


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(fsdp_resumed, tmp_path, cache):
    out = tmp_path / "uninterrupted"
    bench(*FSDP, "--out", str(out), "--cache-dir", str(cache))
    assert results(fsdp_resumed)["adamw-snsm"]["curve"] == results(out)["adamw-snsm"]["curve"]
    assert train_losses(fsdp_resumed, "adamw-snsm") == train_losses(out, "adamw-snsm")


@pytest.mark.parametrize("argv, message", [
    (["--parallel", "fsdp"], "--parallel fsdp needs --nproc N with N >= 2"),
    (["--nproc", "2"], "--nproc 2 needs --parallel ddp or --parallel fsdp"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--parallel", "zero"], "invalid choice: 'zero'"),
    (["--nproc", "3", "--parallel", "ddp"], "--batch-size 8 is not divisible by --nproc 3"),
    (["--nproc", "2", "--parallel", "fsdp", "--optimizers", "adamw,adafactor"],
     "--parallel fsdp: optimizer 'adafactor' does not run under it; it supports --parallel ddp"),
    (["--nproc", "2", "--parallel", "fsdp", "--optimizers", "galore"], "optimizer 'galore' does not run under it"),
    (["--nproc", "2", "--parallel", "ddp", "--optimizers", "adagrad-sn+adaptive"], "runs in one process only"),
    (["--nproc", "2", "--parallel", "ddp", "--device", "cuda:1"], "--device cuda:1"),
])
def test_bad_distributed_input_is_one_line_error(argv, message, capsys, tmp_path):
    if "--device" in argv:
        import torch
        if not torch.cuda.is_available():
            message = "CUDA is not available here"
    assert main(["--preset", "smoke", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snsm-bench: error:") and message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
