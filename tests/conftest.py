import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

SN_CLASSES = ["AdamWSN", "AdamWSNSM", "AdaGradSN", "AdaGradSNSM", "RMSpropSN", "SGDSM"]
SM_CLASSES = ["AdamWSNSM", "AdaGradSNSM", "SGDSM"]
PROJECTIONS = ["svd", "randomized", "srht", "topk", "uniform"]


def golden_dir() -> pathlib.Path:
    """The golden traces: ``$SNSM_GOLDEN_DIR`` if set, else the copy kept in the repository."""
    return pathlib.Path(os.environ.get("SNSM_GOLDEN_DIR") or ROOT / "tests" / "data" / "golden")


def bench_env() -> dict:
    """The environment of a ``python -m snsm.bench`` subprocess: this checkout's ``src`` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_bench(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """``python -m snsm.bench ARGS`` in a subprocess (output captured); ``check``: fail on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "snsm.bench", *args], capture_output=True, text=True,
                          env=bench_env(), timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"snsm.bench {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
