"""The processes around SSH sessions: a connection a host's sessions share, and
what one session says on its stderr.

`ControlMaster` is the `ssh -o ControlMaster=yes` connection that `multiplex=True`
starts once per host; `StderrRelay` reads one session's stderr, keeps it until its
worker joins (a failed launch quotes it), then prints it as that worker's.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from typing import Any

from fastdist.exceptions import ClusterError
from fastdist.managers.process import print_err

# How much of ssh's stderr a launch error quotes.
ERROR_TAIL_NBYTES = 2000


class ControlMaster:
    """One ssh connection per host that the workers' sessions share (multiplex=True)."""

    def __init__(self, ssh: str, flags: list[str], destination: str, path: str) -> None:
        self.path = path
        self.users = 0
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [ssh, "-T", "-a", "-x", "-N", *flags, "-o", "ControlMaster=yes",
             "-o", f"ControlPath={path}", destination],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        """Block until the control socket answers; raise with ssh's words if it never does."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                said = read_tail(self.proc.stderr)
                self.close()
                raise ClusterError(said or f"ssh exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.close()
                raise ClusterError(f"the shared ssh connection was not up within {timeout:g} s")
            time.sleep(0.01)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def read_tail(stream: Any, timeout: float = 1.0) -> str:
    """What is left to read on a dead process's pipe (bounded: a grandchild may hold it)."""
    if stream is None:
        return ""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        fd = stream.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except (OSError, ValueError):
        pass
    return data[-ERROR_TAIL_NBYTES:].decode(errors="replace").strip()


class StderrRelay:
    """Reads one ssh session's stderr to its end: kept (bounded) until the worker joins,
    for the launch error; then printed as the worker's stderr, `From worker N:`."""

    KEEP_LINES = 50

    def __init__(self, fd: int) -> None:
        self.pid: int | None = None
        self.early: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fd,), name="fastdist-ssh-stderr",
                         daemon=True).start()

    def _run(self, fd: int) -> None:
        try:
            with open(fd, "rb") as stream:
                for raw in stream:
                    line = raw.decode(errors="replace").rstrip("\n")
                    with self.lock:
                        pid = self.pid
                        if pid is None:
                            self.early.append(line)
                            del self.early[:-self.KEEP_LINES]
                            continue
                    print_err(f"From worker {pid}:\t{line}")
        finally:
            self.done.set()  # (also when printing failed: early_text need not wait it out)

    def joined(self, pid: int) -> None:
        with self.lock:
            self.pid = pid
            early, self.early = self.early, []
        for line in early:
            print_err(f"From worker {pid}:\t{line}")

    def early_text(self, timeout: float = 1.0) -> str:
        """What the session said before joining (waits briefly for its end)."""
        self.done.wait(timeout)
        with self.lock:
            return "\n".join(self.early).strip()[-ERROR_TAIL_NBYTES:]
