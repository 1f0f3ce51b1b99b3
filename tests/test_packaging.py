"""What a wheel carries, and that an installation from it takes the fused C++ path.

The wheel is built offline (``pip wheel --no-build-isolation``, setuptools from
the test extra) from a copy of the project's sources, so nothing is written
into the checkout. It is installed with ``pip install --target`` into a
temporary directory that a fresh interpreter puts first on its path (``-I``:
no ``PYTHONPATH``, no current directory), so the checkout's editable install
cannot answer ``import snsm``. The kernel build is keyed by the source's
digest in torch's extension cache, whatever directory the source is installed
in, so the installed copy reuses the build the test process already made: the
module takes a few seconds, about 10 s in all (one kernel build, about 40 s,
if nothing else has built it yet).
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from conftest import ROOT
from snsm._kernels import cpu_kernel, unavailable_reason

REQUIRED = [
    "snsm/__init__.py",
    "snsm/py.typed",
    "snsm/_kernels/__init__.py",
    "snsm/_kernels/sn_cpu.cpp",
    "snsm/_kernels/triton_sn.py",
    "snsm/bench/configs/lr.json",
]


def _version() -> str:
    text = (ROOT / "src" / "snsm" / "__init__.py").read_text()
    return re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel offline needs setuptools>=77")
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist")],
        cwd=project, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = (tmp / "dist").glob("snsm-*.whl")
    return path


def test_wheel_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"the wheel lacks {missing}"
    data = [f.name for f in (ROOT / "src" / "snsm" / "bench" / "data").iterdir() if f.is_file()]
    assert data and all(f"snsm/bench/data/{name}" in names for name in data)
    info = f"snsm-{_version()}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {_version()}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    # the kernel source in the wheel is the checkout's
    code = zipfile.ZipFile(wheel).read("snsm/_kernels/sn_cpu.cpp")
    assert code == (ROOT / "src" / "snsm" / "_kernels" / "sn_cpu.cpp").read_bytes()


@pytest.mark.skipif(cpu_kernel() is None, reason=f"fused CPU kernel unavailable here: {unavailable_reason()}")
def test_installed_wheel_takes_the_fused_path(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import hashlib, pathlib
        import torch
        import snsm
        from snsm import _kernels

        site = pathlib.Path({str(target)!r}).resolve()
        assert pathlib.Path(snsm.__file__).resolve().is_relative_to(site), snsm.__file__
        k = _kernels.cpu_kernel()
        assert k is not None, _kernels.unavailable_reason()
        source = site / "snsm" / "_kernels" / "sn_cpu.cpp"
        assert _kernels._SOURCE == source
        digest = hashlib.sha1(source.read_bytes()).hexdigest()[:8]
        assert k.__name__.startswith("snsm_sn_cpu_" + digest), k.__name__
        assert _kernels.kernel_for(torch.device("cpu")) is k

        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32))
        q = torch.nn.Parameter(p.detach().clone())
        fused = snsm.AdamWSN([p], lr=1e-2, weight_decay=0.1, fused=True)  # fused=True raises without the kernel
        reference = snsm.AdamWSN([q], lr=1e-2, weight_decay=0.1, fused=False)
        for _ in range(3):
            g = torch.randn(64, 32)
            p.grad, q.grad = g.clone(), g.clone()
            fused.step()
            reference.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        print("fused from", snsm.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SNSM_DISABLE_KERNELS"}
    run = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fused from " in run.stdout
    assert "RuntimeWarning" not in run.stderr, run.stderr
