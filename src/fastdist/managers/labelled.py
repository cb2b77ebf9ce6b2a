"""Several workers' output on one process's stdout and stderr, each line labelled.

`srun --label` (SlurmManager) and a host's launcher (`python -m fastdist.worker
--count N`, SSHManager's `one_session`) put the task number before each line of
their tasks' output: b"3: text". `LabelledOutput` undoes that on the master:
stdout is split into one pipe per task, the `WorkerConfig.io` stream the
framework reads each worker's address line and later output from; stderr becomes
`From worker PID:` lines once the task's worker has joined, and until then is
kept to explain a failed launch, as are the launcher's own (unlabelled) lines.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from fastdist.managers.base import WorkerConfig
from fastdist.managers.process import print_err
from fastdist.node import worker_timeout

# How many of a launcher's own lines (and each task's early stderr) a launch error
# quotes (srun, a host's launcher, mpiexec).
ERROR_TAIL_LINES = 12


def split_label(raw: bytes) -> tuple[int, bytes] | None:
    """The task number before a line, right-aligned as srun puts it: b" 3: text"."""
    head, sep, rest = raw.partition(b":")
    head = head.strip()
    if not sep or not head.isdigit():
        return None
    return int(head), rest[1:] if rest.startswith(b" ") else rest


class LabelledOutput:
    """Demultiplex a launcher's labelled `stdout` and `stderr` for `ntasks` workers.

    `streams[task]` is the task's stdout (give it to the framework as
    `WorkerConfig.io`); `joined(task, pid)` starts relaying its stderr as worker
    `pid`'s; `said()` is what the launcher and the not-yet-joined tasks wrote, for
    an error message. `on_stderr_end` runs when the launcher's stderr closes.
    """

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes], ntasks: int, name: str,
                 on_stderr_end: Callable[[], object] | None = None) -> None:
        self._lock = threading.Lock()
        self._pids: dict[int, int] = {}  # task -> pid, once joined
        self._early: dict[int, list[str]] = {}  # task -> stderr lines before it joined
        self._own: list[str] = []  # the launcher's own stderr lines
        self._on_stderr_end = on_stderr_end
        writers: list[int] = []
        self.streams: list[IO[bytes]] = []
        for _ in range(ntasks):
            r, w = os.pipe()
            writers.append(w)
            self.streams.append(open(r, "rb", buffering=0))  # noqa: SIM115 - the framework closes it
        threading.Thread(target=self._split_stdout, args=(stdout, writers),
                         name=f"{name}-stdout", daemon=True).start()
        threading.Thread(target=self._relay_stderr, args=(stderr,),
                         name=f"{name}-stderr", daemon=True).start()

    def joined(self, task: int, pid: int) -> None:
        """From now on, task `task`'s stderr is worker `pid`'s (and what it said so far)."""
        with self._lock:
            self._pids[task] = pid
            early = self._early.pop(task, [])
        for line in early:
            print_err(f"From worker {pid}:\t{line}")

    def said(self) -> str:
        """`; it said: ...` with the last lines of the launcher and of each unjoined task."""
        with self._lock:
            lines = list(self._own[-ERROR_TAIL_LINES:])
            for task, early in sorted(self._early.items()):
                lines += [f"task {task}: {line}" for line in early[-ERROR_TAIL_LINES:]]
        return ("; it said: " + " | ".join(lines)) if lines else ""

    def _split_stdout(self, stdout: IO[bytes], writers: list[int]) -> None:
        try:
            for raw in stdout:
                labelled = split_label(raw)
                if labelled is None:
                    continue
                task, line = labelled
                if 0 <= task < len(writers) and writers[task] >= 0:
                    line = line if line.endswith(b"\n") else line + b"\n"
                    try:
                        os.write(writers[task], line)
                    except OSError:
                        # the framework stopped reading (it gave up on that worker)
                        os.close(writers[task])
                        writers[task] = -1
        finally:
            for w in writers:
                if w >= 0:
                    os.close(w)
            stdout.close()

    def _relay_stderr(self, stderr: IO[bytes]) -> None:
        try:
            for raw in stderr:
                text = raw.decode(errors="replace").rstrip("\n")
                labelled = split_label(raw)
                with self._lock:
                    if labelled is None:
                        self._own.append(text)
                        out = text
                    else:
                        task = labelled[0]
                        line = labelled[1].decode(errors="replace").rstrip("\n")
                        pid = self._pids.get(task)
                        if pid is None:
                            self._early.setdefault(task, []).append(line)
                            continue
                        out = f"From worker {pid}:\t{line}"
                print_err(out)
        finally:
            stderr.close()  # (also when printing failed: the pipe is not left to the GC)
            if self._on_stderr_end is not None:
                self._on_stderr_end()


def wait_reported(configs: list[WorkerConfig], proc: subprocess.Popen[bytes]) -> int:
    """Wait until every worker of `configs` has reported its address (the framework
    sets `port`), `proc` has exited, or FASTDIST_WORKER_TIMEOUT (and a margin) has
    passed; how many reported."""
    deadline = time.monotonic() + worker_timeout() + 5
    while time.monotonic() < deadline and proc.poll() is None:
        if all(c.port is not None for c in configs):
            return len(configs)
        time.sleep(0.01)
    time.sleep(0.05)  # the last address may have been read just as the launcher exited
    return sum(c.port is not None for c in configs)
