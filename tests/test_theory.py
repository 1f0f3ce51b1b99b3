"""python -m snsm.bench.theory: the synthetic dimension-dependence experiment, on a tiny configuration."""
import json
import math

import pytest
import torch

from snsm.bench import theory


def test_subset_length_is_a_divisor_near_sqrt_d():
    assert [theory.subset_length(d) for d in (64, 256, 1000, 97)] == [8, 16, 25, 1]


def test_min_grad_norm_decreases_without_noise_and_is_per_seed():
    start = theory.grad_f(torch.full((1, 16), 3.0)).norm().item()
    for method in theory.METHODS:
        vals = theory.min_grad_norms(method, "dense", 16, seeds=5, steps=60, eta=3.0, sigma=0.0, b0=1e-2, seed=0)
        assert vals.shape == (5,) and torch.isfinite(vals).all()
        assert vals.max() < 0.02 * start


def test_noise_masks_have_the_promised_sparsity():
    gen = torch.Generator().manual_seed(0)
    assert theory.noise_mask("dense", 3, 64, gen).sum(1).tolist() == [64.0] * 3
    assert theory.noise_mask("sqrt", 3, 64, gen).sum(1).tolist() == [8.0] * 3
    assert theory.noise_mask("single", 3, 64, gen).sum(1).tolist() == [1.0] * 3


def test_cli_writes_table_json_and_verdict(tmp_path, capsys):
    assert theory.main(["--dims", "16,64", "--seeds", "8", "--steps", "15", "--regimes", "dense,single",
                        "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "theory.json").read_text())
    assert set(out["results"]) == {"dense", "single"}
    for regime in out["results"]:
        assert set(out["results"][regime]) == set(theory.METHODS)
        for tails in out["results"][regime].values():
            assert set(tails) == {"16", "64"} and all(v > 0 and math.isfinite(v) for v in tails.values())
        assert out["eta"][regime]["adagrad"] in theory.ETA_GRID
    assert set(out["verdict"]) == {"dense", "single"}
    md = (tmp_path / "theory.md").read_text()
    assert "| dense | subset-norm |" in md and "Verdict" in md
    assert "theory.md" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "theory.png").stat().st_size > 0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="dims"):
        theory.run(dims=[64], seeds=4, steps=2)
    with pytest.raises(ValueError, match="regime"):
        theory.run(dims=[16, 64], seeds=4, steps=2, regimes=["sparse"])
    with pytest.raises(SystemExit):
        theory.main(["--dims", "a,b"])
