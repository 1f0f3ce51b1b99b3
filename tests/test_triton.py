"""Runs ``triton_cases.py`` (the Triton kernels through Triton's interpreter) in a fresh process."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton not installed (pip install triton; Linux x86_64)")
def test_triton_kernels_through_the_interpreter():
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "triton_cases.py")],
                          cwd=here.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout and "failed" not in done.stdout
