"""What the master does as the program ends: its workers finish what they were
given and say what they have to say, within a bound, before they go.

A script whose last line is `fd.remote_do(print, 2, "hello")` ends before worker 2
has run the call, and the workers exit with the master: the line, and any log
record or partial line, would be lost. At exit the master sends every worker one
last call, `_settle`: it waits (at most `FASTDIST_EXIT_GRACE` seconds, default 5)
until the calls that reached the worker before it have finished, flushes the
worker's streams, and replies; the reply comes after the worker's output and
records, which the master prints and hands to its handlers as it reads the reply
(`output`), partial last lines included. After an uncaught KeyboardInterrupt the
master does not wait for running calls: only what was already said is collected.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time

from fastdist import node as _node
from fastdist.output import drain_worker_output, flush_partial_lines
from fastdist.refs import Future
from fastdist.remotecall import remotecall
from fastdist.signals import sigint_absorbed

__all__ = ["collect_worker_output", "exit_grace"]

_POLL_SECONDS = 0.005
# Beyond the grace: the round trip, and a worker slow to read its last call.
_REPLY_MARGIN_SECONDS = 2.0


def exit_grace() -> float:
    """`FASTDIST_EXIT_GRACE`: seconds a worker may take to finish its calls at exit."""
    try:
        return max(0.0, float(os.environ.get("FASTDIST_EXIT_GRACE", "5")))
    except ValueError:
        return 5.0


def _settle(grace: float) -> None:
    """On a worker: wait until no other call is queued or running (at most `grace`
    seconds), then flush what the worker wrote."""
    n = _node.current()
    pool = n.callpool
    me = threading.get_ident()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        busy = pool.runq.nwaiting > 0 or any(ident != me for ident in list(pool.running_user))
        if not busy:
            break
        time.sleep(_POLL_SECONDS)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - no stream, or a closed one: nothing to say
            pass


def collect_worker_output(grace: float | None = None) -> None:
    """Let every worker finish its calls (up to `grace` seconds), then print what
    they wrote and handle what they logged. Never raises; returns within about
    `grace` + 2 seconds."""
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    if interrupted:
        _ignore_sigint_from_now_on()
    if grace is None:
        grace = 0.0 if interrupted else exit_grace()
    asked: list[int] = []
    try:
        _settle_workers(grace, asked)
    except KeyboardInterrupt:
        pass  # Ctrl-C at exit: wait no more, and leave no traceback behind
    with sigint_absorbed():
        for pid in asked:
            drain_worker_output(pid)
            flush_partial_lines(pid)


def _ignore_sigint_from_now_on() -> None:
    """The program is ending because of a Ctrl-C: a second one (impatience, or a
    terminal that signals twice) would only raise again in what is left of the
    exit — this hook, a finalizer, with stderr perhaps gone — and stack a second
    traceback on the first. Python ends the process by SIGINT itself afterwards."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _settle_workers(grace: float, asked: list[int]) -> None:
    """Send `_settle` to every worker (adding each to `asked`) and wait for the
    replies, until the grace and the margin have passed."""
    n = _node.peek()
    if n is None or n.myid != 1:
        return
    futures: list[Future] = []
    for pid in n.worker_pids():
        try:
            futures.append(remotecall(_settle, pid, grace))
        except Exception:  # noqa: BLE001 - a worker already gone has nothing to say
            continue
        asked.append(pid)
    deadline = time.monotonic() + grace + _REPLY_MARGIN_SECONDS
    for fut in futures:
        try:
            fut.wait(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - too slow or gone: print what came
            pass


atexit.register(collect_worker_output)
