"""How the CPU kernel is loaded: the build message, the warning when it cannot be built, kernel_for.

The builds here are torch's ``cpp_extension.load`` monkeypatched (nothing is
compiled), with ``$TORCH_EXTENSIONS_DIR`` in a temporary directory, and the
module's cached result reset for the test (monkeypatch restores it).
"""
import hashlib
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from conftest import ROOT
from snsm import _kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel untried in this process, an empty extension cache, kernels not disabled."""
    monkeypatch.setattr(_kernels, "_tried", False)
    monkeypatch.setattr(_kernels, "_module", None)
    monkeypatch.setattr(_kernels, "_error", None)
    monkeypatch.delenv("SNSM_DISABLE_KERNELS", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return tmp_path / "extensions"


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_failed_build_warns_once(fresh, monkeypatch):
    def load(**kwargs):
        raise RuntimeError("Error building extension\nno C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", load)
    first, caught = _record(_kernels.cpu_kernel)
    again, caught_again = _record(lambda: (_kernels.cpu_kernel(), _kernels.kernel_for("cpu")))
    assert first is None and again == (None, None)
    assert len(caught) == 1 and not caught_again
    text = str(caught[0].message)
    assert "no C++ compiler found" in text  # why
    assert "reference path, several times slower on CPU" in text  # what it costs
    assert "SNSM_DISABLE_KERNELS=1" in text  # how to silence it
    assert _kernels.unavailable_reason() == "RuntimeError: no C++ compiler found"


def test_disabled_kernels_do_not_warn(fresh, monkeypatch):
    def load(**kwargs):
        raise AssertionError("SNSM_DISABLE_KERNELS must not build")

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setenv("SNSM_DISABLE_KERNELS", "1")
    module, caught = _record(_kernels.cpu_kernel)
    assert module is None and not caught
    assert _kernels.unavailable_reason() == "disabled by SNSM_DISABLE_KERNELS"


def _fake_load(calls):
    """A stand-in for cpp_extension.load that 'builds' the module file torch would write."""
    def load(name, sources, build_directory=None, **kwargs):
        calls.append((name, sources, build_directory))
        if build_directory:
            open(os.path.join(build_directory, f"{name}.so"), "wb").close()
        return types.SimpleNamespace(__name__=name)
    return load


def test_first_build_message_once(fresh, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    module = _kernels.cpu_kernel()
    assert _kernels.cpu_kernel() is module and _kernels.kernel_for(torch.device("cpu")) is module
    err = capsys.readouterr().err
    assert err == "snsm: building the CPU kernel, once, about 40 s\n"
    assert len(calls) == 1
    # the build compiles a copy of the source inside its own build directory (a stable path)
    name, sources, build_directory = calls[0]
    code = (ROOT / "src" / "snsm" / "_kernels" / "sn_cpu.cpp").read_bytes()
    assert name.startswith(f"snsm_sn_cpu_{hashlib.sha1(code).hexdigest()[:8]}_")
    assert os.path.dirname(sources[0]) == build_directory and str(fresh) in build_directory
    assert open(sources[0], "rb").read() == code


def test_cached_build_is_silent(fresh, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    _kernels.cpu_kernel()
    capsys.readouterr()
    monkeypatch.setattr(_kernels, "_tried", False)  # a second process, the build in the cache
    monkeypatch.setattr(_kernels, "_module", None)
    assert _kernels.cpu_kernel() is not None
    assert capsys.readouterr().err == ""
    assert len(calls) == 2 and calls[0][1] == calls[1][1]


def test_kernel_for_devices(fresh, monkeypatch):
    monkeypatch.setattr(_kernels, "cpu_kernel", lambda: "cpu module")
    assert _kernels.kernel_for(torch.device("cpu")) == "cpu module"
    assert _kernels.kernel_for("cpu") == "cpu module"
    assert _kernels.kernel_for(torch.device("meta")) is None
    monkeypatch.setattr(_kernels.triton_sn, "available", lambda: True)
    assert _kernels.kernel_for(torch.device("cuda", 1)) is _kernels.triton_sn
    assert _kernels.kernel_for("cuda:0") is _kernels.triton_sn
    monkeypatch.setattr(_kernels.triton_sn, "available", lambda: False)
    assert _kernels.kernel_for(torch.device("cuda")) is None


def test_warning_visible_by_default(tmp_path):
    """In a plain interpreter (default warning filters, no logging set up) a failed build is seen once."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # the extension cache cannot be created under a file: the build fails
    env = {k: v for k, v in os.environ.items() if k not in ("SNSM_DISABLE_KERNELS", "PYTHONWARNINGS")}
    env.update(TORCH_EXTENSIONS_DIR=str(blocker / "extensions"), PYTHONPATH=str(ROOT / "src"))
    code = "from snsm import _kernels as k; assert k.cpu_kernel() is None and k.cpu_kernel() is None"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("RuntimeWarning: snsm: the fused CPU kernel cannot be built") == 1, out.stderr
    assert "building the CPU kernel" not in out.stderr
