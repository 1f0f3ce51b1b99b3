"""Files the benchmark writes: atomically (a temporary file, then a rename), and a job's log file.

A lowest-layer module: it imports nothing from the rest of the package.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename."""
    import torch
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log_to_file(job: dict, name: str) -> None:
    """Send this process' logging (and library warnings) to ``<job dir>/<name>``."""
    jobdir = Path(job["dir"])
    jobdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(jobdir / name, mode="a" if job.get("resume") else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings go to the log, not through the progress bars
