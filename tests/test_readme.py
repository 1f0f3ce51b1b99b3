"""The README's quick start runs as written, and the README names both commands."""
import re

import torch

from conftest import ROOT


def test_quick_start_runs_and_trains():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    def final_loss(source):
        torch.manual_seed(0)  # same model and data for both runs
        namespace = {}
        exec(compile(source, "README.md", "exec"), namespace)
        model, x, y = namespace["model"], namespace["x"], namespace["y"]
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item(), namespace["opt"]

    trained, opt = final_loss(code)
    untrained, _ = final_loss(code.replace("range(20)", "range(0)"))
    assert opt.state and trained < 0.8 * untrained


def test_readme_commands():
    text = (ROOT / "README.md").read_text()
    assert "make bench" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
