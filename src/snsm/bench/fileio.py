"""Files the benchmark writes: atomically (a temporary file, then a rename), and a job's log file.

A temporary is named ``.<name>.tmp<pid>`` beside its file. A writer that fails (a full disk, an
interrupt) removes its temporary; one killed outright cannot, so a run sweeps its output directory
for temporaries whose process is gone (:func:`sweep_temporaries`) before it starts. An ``OSError``
while writing becomes a :class:`WriteError` (``cannot write to PATH: REASON``), which the command
line reports on one line (exit status 2).

A lowest-layer module: it imports only :class:`snsm.bench.BenchError`.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from . import BenchError

log = logging.getLogger(__name__)

TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # .<name>.tmp<pid>, as the writers below name them


class WriteError(BenchError):
    """``path`` (a file or a directory) could not be written: ``cannot write to PATH: REASON``."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot write to {path}: {reason}")
        self.path, self.reason = Path(path), reason


def os_reason(e: OSError) -> str:
    """The reason an ``OSError`` gives, without the errno and the file name: ``No space left on device``."""
    if e.strerror:
        return e.strerror
    if e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, os_reason(e)) from e


def temporary_for(path: Path) -> Path:
    """The temporary :func:`atomic_write_text` and :func:`atomic_torch_save` write ``path`` through."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to the temporary of ``path``, then rename it to ``path``; on failure the temporary
    is removed and an ``OSError`` becomes a :class:`WriteError`."""
    path = Path(path)
    tmp = temporary_for(path)
    with writing(path):
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: leave no partial temporary behind
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename."""
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file: a full disk raises OSError, not RuntimeError
            torch.save(obj, f)
    atomic_write(path, save)


def ensure_writable_dir(path: Path) -> None:
    """Create the directory ``path`` if needed and check that a file can be written in it (by writing
    one: permission bits do not stop root, a read-only file system or a full disk do); raises
    :class:`WriteError` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(path, os.strerror(errno.ENOTDIR))
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_for(path / "write-probe")
        try:
            probe.write_bytes(b"")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove the temporaries (``.<name>.tmp<pid>``) under ``root`` whose writer is no longer running
    (killed before it could remove them); a live process' temporary stays. Returns those removed."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in root.rglob(".*.tmp*"):
        m = TEMPORARY.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) under %s", len(removed), root)
    return removed


def log_to_file(job: dict, name: str) -> None:
    """Send this process' logging (and library warnings) to ``<job dir>/<name>``."""
    jobdir = Path(job["dir"])
    with writing(jobdir / name):
        jobdir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(jobdir / name, mode="a" if job.get("resume") else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings go to the log, not through the progress bars


def save_figure(fig, path: Path, **savefig_options: Any) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_options))
    finally:
        plt.close(fig)
