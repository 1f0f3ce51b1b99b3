"""Fast paths: a fused CPU kernel for the Subset-Norm update, built on first use.

The kernel (``sn_cpu.cpp``) is compiled once per machine with the system C++
compiler through ``torch.utils.cpp_extension`` (needs a compiler and the
``ninja`` package) and cached by torch under ``$TORCH_EXTENSIONS_DIR``. Where it
cannot be built the optimizers use the reference path and say so once in the
log. ``SNSM_DISABLE_KERNELS=1`` turns the kernel off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading

logger = logging.getLogger(__name__)

_HERE = pathlib.Path(__file__).resolve().parent
_lock = threading.Lock()
_module = None
_tried = False
_error = None


def _cpu_tag() -> str:
    """A tag of the CPU's instruction-set flags: the build uses -march=native."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "generic"


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

            source = _HERE / "sn_cpu.cpp"
            digest = hashlib.sha1(source.read_bytes()).hexdigest()[:8]
            native = _cpu_tag() != "generic"
            flags = ["-O3", "-fno-math-errno", "-fopenmp", "-std=c++17"] + (["-march=native"] if native else [])
            _module = cpp_extension.load(
                name=f"snsm_sn_cpu_{digest}_{_cpu_tag()}",
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            logger.info("snsm: fused CPU kernel ready")
        except Exception as exc:  # no compiler, no ninja, no headers: fall back
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            logger.warning("snsm: fused CPU kernel unavailable (%s); using the reference path", _error)
            _module = None
    return _module


def unavailable_reason():
    """Why :func:`cpu_kernel` returned ``None`` (``None`` if it is available or untried)."""
    return _error
