"""Fast paths: a fused CPU kernel for the Subset-Norm update, built on first use.

The kernel (``sn_cpu.cpp``) is compiled once per machine with the system C++
compiler through ``torch.utils.cpp_extension`` (needs a compiler and the
``ninja`` package) and cached by torch under ``$TORCH_EXTENSIONS_DIR``. The
build is keyed by the source's digest and the CPU's flags, and compiles a copy
of the source kept in its build directory, so every installation of the same
source (a checkout, a wheel, several environments) shares one build. The first
build writes one line to stderr before it starts (it takes about 40 s).

Where the kernel cannot be built, the optimizers use the reference path and a
``RuntimeWarning`` says why, once per process. ``SNSM_DISABLE_KERNELS=1`` turns
the kernel off, without a warning.

:func:`kernel_for` picks the kernel for a device: this C++ module on CPU, the
Triton kernels (:mod:`snsm._kernels.triton_sn`) on CUDA.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import sys
import threading
import warnings

from . import triton_sn

__all__ = ["cpu_kernel", "unavailable_reason", "kernel_for", "triton_sn"]

logger = logging.getLogger(__name__)

_HERE = pathlib.Path(__file__).resolve().parent
_SOURCE = _HERE / "sn_cpu.cpp"
_lock = threading.Lock()
_module = None
_tried = False
_error = None

#: written to stderr before a build that is not in torch's extension cache yet
BUILD_MESSAGE = "snsm: building the CPU kernel, once, about 40 s\n"
#: what the fallback costs, in the warning when the kernel cannot be built
FALLBACK_COST = ("the optimizers fall back to the reference path, several times slower on CPU; "
                 "set SNSM_DISABLE_KERNELS=1 to silence")


def _cpu_tag() -> str:
    """A tag of the CPU's instruction-set flags: the build uses -march=native."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "generic"


def _build_source(cpp_extension, name: str, code: bytes):
    """(source to compile, build directory or None, whether a build is due).

    The source is copied into the extension's build directory (rewritten only
    when its bytes differ): ninja rebuilds when the compile command changes, and
    the command names the source's path, so compiling the installed file itself
    would rebuild each time another installation (a wheel, a checkout) loads it.
    A build is due when the built module is missing or the copy was (re)written.
    """
    build_directory = getattr(cpp_extension, "_get_build_directory", None)
    if build_directory is None:  # a private helper of torch's: without it, compile in place
        return _SOURCE, None, True
    build_dir = pathlib.Path(build_directory(name, False))
    source = build_dir / _SOURCE.name
    try:
        fresh = source.read_bytes() != code
    except OSError:
        fresh = True
    if fresh:
        tmp = build_dir / f".{_SOURCE.name}.{os.getpid()}.tmp"
        tmp.write_bytes(code)
        os.replace(tmp, source)  # atomic: a concurrent load reads the old copy or the new one
    return source, build_dir, fresh or not (build_dir / f"{name}.so").exists()


def cpu_kernel():
    """The compiled CPU kernel module, or ``None`` (reason in :func:`unavailable_reason`)."""
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("SNSM_DISABLE_KERNELS"):
            _error = "disabled by SNSM_DISABLE_KERNELS"
            return None
        try:
            from torch.utils import cpp_extension

            code = _SOURCE.read_bytes()
            digest = hashlib.sha1(code).hexdigest()[:8]
            native = _cpu_tag() != "generic"
            flags = ["-O3", "-fno-math-errno", "-fopenmp", "-std=c++17"] + (["-march=native"] if native else [])
            name = f"snsm_sn_cpu_{digest}_{_cpu_tag()}"
            source, build_dir, due = _build_source(cpp_extension, name, code)
            if due:
                sys.stderr.write(BUILD_MESSAGE)
                sys.stderr.flush()
            _module = cpp_extension.load(
                name=name,
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=None if build_dir is None else str(build_dir),
                verbose=False,
            )
            logger.info("snsm: fused CPU kernel ready")
        except Exception as exc:  # no compiler, no ninja, no headers: fall back
            text = str(exc).strip()
            _error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
            _module = None
            warnings.warn(f"snsm: the fused CPU kernel cannot be built ({_error}); {FALLBACK_COST}",
                          RuntimeWarning, stacklevel=2)
    return _module


def unavailable_reason():
    """Why :func:`cpu_kernel` returned ``None`` (``None`` if it is available or untried)."""
    return _error


def kernel_for(device):
    """The fused kernel for tensors on ``device`` (a ``torch.device`` or its name): the C++
    module on CPU, the Triton kernels on CUDA where Triton imports, else ``None``. Both
    expose ``sn_step`` and ``sn_accumulate`` with one signature; the C++ one also
    ``fused_step``."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    if kind == "cpu":
        return cpu_kernel()
    if kind == "cuda" and triton_sn.available():
        return triton_sn
    return None
