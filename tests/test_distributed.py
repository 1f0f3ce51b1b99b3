"""DDP, FSDP2 and Distributed Checkpoint with gloo on 2 CPU processes.

Each scenario runs tests/dist_worker.py under torch.distributed.run and checks
the results rank 0 reports: sharded == unsharded training on the combined
batch (uneven shards, tall and wide matrices, every optimizer and projector),
DDP == single process, DCP save/load/continue == uninterrupted (bit for bit),
identical replicated state on every rank, and a checkpoint written by 2 ranks
loaded into 1.
"""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import ROOT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def run(scenario, nproc, tmp_path, *extra):
    out = tmp_path / f"{scenario}-{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "dist_worker.py"), scenario, str(out), *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def failures(results):
    return [k for k, ok in results.items() if not ok]


def test_fsdp2_matches_unsharded_training(tmp_path):
    results = run("parity", 2, tmp_path)
    assert len(results) >= 30
    assert not failures(results)


def test_sharded_usable_gradient_check_agrees_with_the_whole_matrix(tmp_path):
    results = run("unusable", 2, tmp_path)
    assert len(results) == 6 * 8  # 6 cases, each with the odd entry in each of 7 rows, then in a 1-row matrix
    assert not failures(results), failures(results)


def test_overlapped_steps_get_their_sums_small_ones_bucketed_large_ones_alone(tmp_path):
    results = run("overlap", 2, tmp_path)
    assert len(results) == 7
    assert not failures(results), failures(results)


def test_fsdp2_bf16_state_rounds_stochastically_as_one_process(tmp_path):
    """bf16 state under FSDP2 is written back with the same stochastic rounding as one process: the
    sharded state's bits equal one process's (nearly all: reductions in another order may move a
    value across a rounding boundary), where rounding to nearest (the control) leaves many apart."""
    results = run("bf16", 2, tmp_path)
    configs = sorted({k.rsplit(":", 1)[0] for k in results})
    assert len(configs) == 7
    for config in configs:
        assert results[f"{config}:params"] == 1.0, config
        assert results[f"{config}:sr"] >= 0.97, (config, results[f"{config}:sr"])
        assert results[f"{config}:nearest"] < results[f"{config}:sr"] - 0.1, (config, results)


def test_in_backward_under_ddp_and_fsdp2_matches_one_process(tmp_path):
    results = run("inbackward", 2, tmp_path)
    assert len(results) == 5 * 5  # 5 optimizers: DDP and FSDP2 at 1 and 2 micro-batches, DDP's no_sync at 2
    assert not failures(results), failures(results)


def test_ddp_matches_single_process(tmp_path):
    results = run("ddp", 2, tmp_path)
    assert results and not failures(results)


def test_dcp_resume_is_exact_and_reshards_to_one_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    results = run("dcp", 2, tmp_path, ckpt)
    assert len(results) >= 30
    assert not failures(results)
    # the same checkpoints, written by 2 ranks, continue in a 1-rank run
    results = run("reshard", 1, tmp_path, ckpt)
    assert results and not failures(results)


def test_readme_fsdp2_example_trains_and_checkpoints():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "fsdp2_train.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    final = float(proc.stdout.split("final loss ")[1].split(";")[0])
    assert len(losses) == 3 and final < 0.2 * losses[0]
