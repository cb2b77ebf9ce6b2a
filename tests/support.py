"""Helpers shared by the integration tests: waiting on a condition, seeing a process,
a master process killed in the middle, reading captured output, bytes sent."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `pred` until it returns something true; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def eventually(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Whether `pred` comes true within `timeout` s (for `assert eventually(...), why`,
    where the failure message should show state gathered while waiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def os_alive(ospid: int) -> bool:
    """True while process `ospid` exists and is not a zombie."""
    try:
        with open(f"/proc/{ospid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# A master whose workers print their address and wait, while it never connects:
# killing it shows whether workers that never joined outlive their master.
# It prints each worker's OS pid on a line of its own.
UNJOINED_MASTER = """\
import os, time
import fastdist.cluster as cluster
import fastdist as fd

# Workers are set up on concurrent threads: print() writes the number and the newline
# separately, so two threads could interleave them; one os.write per line cannot.
def setup(n, manager, config):
    cluster.read_worker_address(config, 0)
    os.write(1, f"{config.ospid}\\n".encode())
    time.sleep(600)
cluster._setup_worker = setup
fd.addprocs(2)
"""


def workers_outlive_a_crashed_master(script: str, exit_timeout: float,
                                     gone_timeout: float) -> bool:
    """Run `script` as a master that prints its workers' OS pids (a JSON list), waits
    for a line on stdin, then dies without removing them (`os._exit`); whether any of
    those workers is still alive `gone_timeout` s after it died."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as master:
        try:
            assert master.stdout is not None and master.stdin is not None
            ospids = json.loads(master.stdout.readline())
            assert all(os_alive(p) for p in ospids)
            master.stdin.write("\n")
            master.stdin.flush()
            master.wait(timeout=exit_timeout)
            return not eventually(lambda: not any(os_alive(p) for p in ospids), gone_timeout)
        finally:
            master.kill()


def reap_master(master: subprocess.Popen[bytes], ospids: list[int]) -> None:
    """After a test that runs a master subprocess: kill it and whatever it left."""
    if master.poll() is None:
        master.kill()
        master.wait()
    if master.stdout is not None:
        master.stdout.close()
    for p in ospids:
        if os_alive(p):
            os.kill(p, signal.SIGKILL)


class _Tee(io.TextIOBase):
    """A text stream that keeps everything written to it, and passes it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.append(text)
        return self.inner.write(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


class Printed:
    """What this process prints to sys.stdout and sys.stderr (see `collect_printed`)."""

    def __init__(self, out: _Tee, err: _Tee) -> None:
        self._streams = {"out": out, "err": err}

    @property
    def out(self) -> str:
        return self._streams["out"].text()

    @property
    def err(self) -> str:
        return self._streams["err"].text()

    def wait_for(self, needle: str, stream: str = "out", timeout: float = 10.0) -> dict[str, str]:
        """Both streams as they are once `needle` shows on `stream` (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while needle not in self._streams[stream].text() and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"out": self.out, "err": self.err}


# Every tee stays alive to the end of the session: CPython's print() holds a
# borrowed reference to sys.stdout while it writes, so a relay thread printing as
# the block ends (and sys.stdout is set back) would write into a freed tee
# (CPython issue 130163).
_TEES_KEPT: list[_Tee] = []


@contextmanager
def collect_printed() -> Iterator[Printed]:
    """Keep what this process prints while the block runs — worker output relayed by
    background threads included — and pass it on to the streams it replaces.

    Not pytest's capfd or capsys: their readouterr reads the captured text, then
    truncates it, and a thread that writes in between (the reader lets the GIL go as
    it reads) loses its line. Used inside a test's body, as pytest sets sys.stdout
    and sys.stderr again as each phase of a test starts."""
    out, err = _Tee(sys.stdout), _Tee(sys.stderr)
    _TEES_KEPT.extend((out, err))
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield Printed(out, err)
    finally:
        sys.stdout, sys.stderr = saved


def read_until(capture: Any, needle: str, stream: str = "out",
               timeout: float = 10.0) -> dict[str, str]:
    """Everything `capture` (capfd or capsys) collects until `needle` shows on `stream`.
    It may lose a line a thread writes as it reads: see collect_printed."""
    seen = {"out": "", "err": ""}
    deadline = time.monotonic() + timeout
    while True:
        got = capture.readouterr()
        seen["out"] += got.out
        seen["err"] += got.err
        if needle in seen[stream] or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def bytes_sent() -> dict[int, int]:
    """Bytes this process sent to each peer, through the socket or (large buffers)
    shared memory."""
    import fastdist as fd

    return {w: s["bytes_sent"] + s["shm_bytes_sent"] for w, s in fd.stats()["peers"].items()}


def netns_flags(net: Any) -> list[str]:
    """ssh flags that log in to every host of the `netns_hosts` fixture."""
    flags = []
    for h in net.hosts:
        flags += ["-i", h.sshd.key_path]
    return flags + ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def closed_by_peer(sock: Any, timeout: float) -> bool:
    """True if the peer closes `sock` within `timeout` s (whatever it sent first)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def recv_exact(sock: Any, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; EOFError if it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def same_items(a: list[Any], b: list[Any]) -> bool:
    """Equal item by item, of the same type, and floats bit for bit (-0.0, nan)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if type(x) is not type(y):
            return False
        if type(x) is float:
            if struct.pack("<d", x) != struct.pack("<d", y):
                return False
        elif x != y:
            return False
    return True
