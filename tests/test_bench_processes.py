"""The benchmark's processes (issue "torch.optim conformance and robustness", item 12): workers die
with their parent (SIGKILL or SIGTERM of ``python -m snsm.bench``), an output that cannot be
written is a one-line error (status 2), no temporary file outlives a kill and a resume, and a job
that failed makes the run exit non-zero.

The runs use the smoke preset shrunk to sequence 64, batch 4; the killed run trains 100 steps so
that its workers, left alone, would outlive the kill by several seconds (with the fix they are gone
in well under one). About 75 s on two cores. Linux only (reads /proc).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark needs the [bench] extra (transformers)")
pytest.importorskip("tokenizers", reason="the benchmark needs the [bench] extra (tokenizers)")
pytest.importorskip("matplotlib", reason="the benchmark needs the [bench] extra (matplotlib)")
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

from snsm.bench import cli  # noqa: E402
from snsm.bench.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["adamw", "adamw-sn"]
STEPS = 300  # long enough that no job finishes before every job has checkpointed, even on 2 busy cores
SMALL = ["--preset", "smoke", "--seq-len", "64", "--batch-size", "4", "--steps", str(STEPS), "--eval-every", str(STEPS),
         "--eval-seqs", "8", "--ckpt-every", "2", "--vocab-size", "512", "--workers", "2", "--no-progress",
         "--optimizers", ",".join(JOBS)]
GONE_WITHIN_S = 15.0  # a worker must be gone this soon after its parent (its SIGTERM handler may wait for a
# starved CPU); left alone it trains for much longer


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start(args, log: Path) -> subprocess.Popen:
    """``python -m snsm.bench ARGS`` in its own session (so the test can always clean up its group)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "snsm.bench", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of process ``pid``, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (PID 1 of a container may never reap an orphan)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[0] not in ("Z", "X"):
            parents[int(d.name)] = st[1]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_until(cond, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the benchmark exited {proc.returncode} too early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for the workers:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _survivors(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while True:
        left = {p for p in pids if _alive(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _cleanup(proc: subprocess.Popen, pids: set[int]) -> None:
    """Whatever is left of a run (its process group, and any pid seen), killed."""
    for kill in [lambda: os.killpg(proc.pid, signal.SIGKILL)] + [lambda p=p: os.kill(p, signal.SIGKILL) for p in pids]:
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.wait(30)


def _workers(parent: int) -> set[int]:
    """The parent's spawned worker processes (and their children)."""
    return {p for p in _descendants(parent) if "multiprocessing" in _cmdline(p)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import snsm._kernels

    snsm._kernels.cpu_kernel()  # built (or found) before the runs: no worker waits ~40 s for it while its peer trains
    return tmp_path_factory.mktemp("bench-proc-cache")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, cache):
    """A run SIGKILLed once every job has written a checkpoint: ``(out, workers, survivors)``, the
    workers alive at the kill and those still alive a few seconds later."""
    out = tmp_path_factory.mktemp("killed") / "run"
    log = out.parent / "bench.log"
    proc = _start([*SMALL, "--out", str(out), "--cache-dir", str(cache)], log)
    workers: set[int] = set()
    try:
        _wait_until(lambda: all((out / j / "checkpoint.pt").exists() for j in JOBS), 300, proc, log)
        workers = _descendants(proc.pid)
        assert len(_workers(proc.pid)) >= len(JOBS), [_cmdline(p) for p in workers]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        unfinished = [j for j in JOBS if not (out / j / "result.json").exists()]
        survivors = _survivors(workers, GONE_WITHIN_S)
    finally:
        _cleanup(proc, workers)
    assert unfinished == JOBS, "a job finished before the kill; the run is too short to test anything"
    return out, workers, survivors


def test_sigkill_of_the_parent_takes_its_workers(killed_run):
    _, workers, survivors = killed_run
    assert workers
    assert not survivors, f"left running after SIGKILL of their parent: {[_cmdline(p) for p in survivors]}"


def test_sigterm_stops_the_workers_waits_for_them_and_exits_non_zero(tmp_path, cache):
    out = tmp_path / "run"
    log = tmp_path / "bench.log"
    proc = _start([*SMALL, "--out", str(out), "--cache-dir", str(cache)], log)
    workers: set[int] = set()
    try:  # every worker is in its job (its log open), importing or training
        _wait_until(lambda: all((out / j / "worker.log").exists() for j in JOBS), 300, proc, log)
        workers = _descendants(proc.pid)
        assert len(_workers(proc.pid)) >= len(JOBS), [_cmdline(p) for p in workers]
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(60)
        survivors = _survivors(workers, 2.0)  # the parent waited for its workers (2 s: the resource tracker)
    finally:
        _cleanup(proc, workers)
    assert code == 143, log.read_text()[-3000:]
    assert "snsm-bench: terminated; continue with --resume" in log.read_text()
    assert not survivors, f"left running after SIGTERM of their parent: {[_cmdline(p) for p in survivors]}"
    assert not list(out.rglob("*.tmp*"))  # stopped writers removed their temporaries


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_resume_after_kill_removes_stale_temporaries_and_a_failed_job_fails_the_run(killed_run, cache):
    out = killed_run[0]
    # the temporaries killed writers leave behind, and one of a live process, which must stay
    dead = _dead_pid()
    stale = [out / "adamw" / f".checkpoint.pt.tmp{dead}", out / "adamw-sn" / f".result.json.tmp{dead}",
             out / f".summary.json.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"partial")
    live = out / "adamw" / f".curve.csv.tmp{os.getpid()}"
    live.write_bytes(b"being written")
    (out / "adamw-sn" / "checkpoint.pt").write_bytes(b"not a checkpoint: cut short by a full disk")
    proc = subprocess.run([sys.executable, "-m", "snsm.bench", *SMALL, "--out", str(out), "--cache-dir", str(cache),
                           "--resume", "-q"], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("snsm-bench: error:")]
    assert len(errors) == 1 and errors[0].startswith("snsm-bench: error: job adamw-sn failed: "), proc.stderr[-3000:]
    assert "adamw-sn/checkpoint.pt is not a readable checkpoint" in errors[0]
    assert "Traceback" not in proc.stderr
    results = {o["name"]: o for o in json.loads((out / "summary.json").read_text())["optimizers"]}
    assert not results["adamw"]["skipped"] and results["adamw"]["steps"] == STEPS  # its peer resumed to the end
    assert results["adamw-sn"]["skipped"] and results["adamw-sn"]["reason"].startswith("failed:")
    assert live.exists()  # a live writer's temporary is not touched
    live.unlink()
    assert not list(out.rglob("*.tmp*")), list(out.rglob("*.tmp*"))


def test_failed_jobs_give_non_zero_exit_skipped_peers_do_not(capsys):
    done = {"name": "adamw", "status": "done"}
    skipped = {"name": "adam-mini", "status": "skipped", "skipped": True, "reason": "adam-mini not importable"}
    failed = {"name": "adamw-sn", "status": "failed", "skipped": True,
              "reason": "failed: UnpicklingError: invalid load key (see x/worker.log)\nmore"}
    assert cli.report_failures([done, skipped]) == 0 and capsys.readouterr().err == ""
    assert cli.report_failures([done, failed, skipped, {"name": "w", "status": "failed"}]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "snsm-bench: error: job adamw-sn failed: UnpicklingError: invalid load key (see x/worker.log)",
        "snsm-bench: error: job w failed: no reason recorded"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("kind", ["file", "under-a-file", "no-permission"])
def test_unwritable_out_is_a_one_line_error(kind, tmp_path, capsys):
    f = tmp_path / "somefile"
    f.write_text("x")
    out = {"file": f, "under-a-file": f / "sub", "no-permission": tmp_path / "ro" / "sub"}[kind]
    if kind == "no-permission":
        if os.geteuid() == 0:
            pytest.skip("root writes through permission bits")
        out.parent.mkdir()
        out.parent.chmod(0o500)
    try:
        assert main([*SMALL, "--out", str(out)]) == 2
    finally:
        if kind == "no-permission":
            out.parent.chmod(0o700)
    reason = {"file": "Not a directory", "under-a-file": "Not a directory", "no-permission": "Permission denied"}[kind]
    assert _one_line_error(capsys) == f"snsm-bench: error: cannot write to {out}: {reason}"


@pytest.mark.parametrize("target", ["config.json", "init_model.pt"])
def test_full_disk_is_a_one_line_error_and_leaves_no_temporary(target, tmp_path, cache, capsys, monkeypatch):
    """ENOSPC part-way through writing ``target`` (its temporary half written)."""
    out = tmp_path / "run"
    if target == "config.json":
        real = Path.write_text

        def write_text(self, data, *a, **kw):
            if self.name.startswith(f".{target}.tmp"):
                real(self, data[: len(data) // 2], *a, **kw)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, data, *a, **kw)
        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        import torch
        real_save = torch.save

        def save(obj, f, *a, **kw):
            if getattr(f, "name", "").startswith(str(out / f".{target}.tmp")):
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *a, **kw)
        monkeypatch.setattr(torch, "save", save)
    assert main([*SMALL, "--out", str(out), "--cache-dir", str(cache), "-q"]) == 2
    assert _one_line_error(capsys) == f"snsm-bench: error: cannot write to {out / target}: No space left on device"
    assert not list(out.rglob("*.tmp*")) and not (out / target).exists()
