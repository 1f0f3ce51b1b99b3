import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

SN_CLASSES = ["AdamWSN", "AdamWSNSM", "AdaGradSN", "AdaGradSNSM", "RMSpropSN", "SGDSM"]
SM_CLASSES = ["AdamWSNSM", "AdaGradSNSM", "SGDSM"]
PROJECTIONS = ["svd", "randomized", "srht", "topk", "uniform"]


def golden_dir() -> pathlib.Path:
    """The golden traces: ``$SNSM_GOLDEN_DIR`` if set, else the copy kept in the repository."""
    return pathlib.Path(os.environ.get("SNSM_GOLDEN_DIR") or ROOT / "tests" / "data" / "golden")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
