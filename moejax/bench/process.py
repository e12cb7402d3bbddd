"""One benchmark worker in a subprocess of its own session: its output streamed to our stderr, its last result
line kept, and the whole process group killed on a timeout, an error or an interrupt, so that no engine outlives
the bench holding device memory."""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

from moejax.bench.measure import parse_result_line


@dataclasses.dataclass
class WorkerRun:
    result: dict  # the last result line ({} if none came)
    error: str | None  # why the process failed (exit status, signal, timeout), None if it exited 0
    wall_s: float


def _kill(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the worker's process group, SIGKILL after grace_s. The group is the one we created for it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def _last_error_line(lines) -> str | None:
    """The most telling stderr line: the last that names an exception, else the last non-empty one."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or "out of memory" in ln.lower():
            return ln[:400]
    return lines[-1][:400] if lines else None


def run_worker(argv: list[str], label: str, env: dict | None = None, timeout_s: float | None = None) -> WorkerRun:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    box = {"result": {}}
    tail: collections.deque = collections.deque(maxlen=40)

    def pump_stdout():
        for line in proc.stdout:
            r = parse_result_line(line)
            if r is not None:
                box["result"] = r
            else:
                sys.stderr.write(f"[{label}] {line}")

    def pump_stderr():
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(f"[{label}] {line}")

    pumps = [threading.Thread(target=f, daemon=True) for f in (pump_stdout, pump_stderr)]
    for t in pumps:
        t.start()
    error = None
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc, error = proc.returncode, f"timed out after {timeout_s:.0f} s"
    except BaseException:
        _kill(proc)
        raise
    finally:
        for t in pumps:
            t.join(timeout=10)
    if error is None and rc:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        last = _last_error_line(tail)
        error = why + (f": {last}" if last else "")
    return WorkerRun(box["result"], error, time.perf_counter() - t0)
