"""A randomized check of concurrent work against a model of what each step must return.

A seeded generator interleaves calls, nested calls between workers, long calls,
channel puts and takes in every ownership, maps, timeouts, interrupts and kills
on a live cluster, and checks every outcome against a model: a call returns its
argument, a channel hands out what was put in FIFO order, a long call outlives a
short fetch timeout, an interrupted call raises KeyboardInterrupt, a killed
worker's calls raise ProcessExitedException. Every wait is bounded
(`STEP_SECONDS`), so a deadlock fails the run with its seed and the steps that
led to it rather than hanging it.

`Run(seed, ...).steps(n)` is the unit; tests/integration/test_concurrency_random.py
runs a few short ones, `python tests/soak_concurrency.py` runs them for as long
as it is asked to.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import fastdist as fd

# Longest any single step may wait for anything.
STEP_SECONDS = 15.0


class ModelError(AssertionError):
    """What the cluster did differs from the model (or it did not answer in time)."""


# -- what runs on the processes (importable by name) -------------------------------------------


def echo(x: Any) -> Any:
    return x


def nested(other: int, x: Any) -> Any:
    return fd.remotecall_fetch(echo, other, x)


def sleep_then(seconds: float, x: Any) -> Any:
    time.sleep(seconds)
    return x


def put_into(rc: Any, v: Any) -> Any:
    rc.put(v)
    return v


def take_from(rc: Any) -> Any:
    return rc.take()


_owner: dict[str, Any] = {"holder": None, "overlaps": 0}


def exclusive(x: int) -> tuple[int, int]:
    """A pool's call: holds this process's state for a moment; counts overlaps."""
    if _owner["holder"] is not None:
        _owner["overlaps"] += 1
    _owner["holder"] = x
    time.sleep(0.002)
    if _owner["holder"] != x:
        _owner["overlaps"] += 1
    _owner["holder"] = None
    return fd.myid(), x


def overlaps_seen() -> int:
    n, _owner["overlaps"] = _owner["overlaps"], 0
    return n


def block_until_interrupted(started: Any) -> None:
    started.put(fd.myid())
    time.sleep(60)


# -- the model ------------------------------------------------------------------------------


class _Pending:
    """A call in flight and what it may end with."""

    __slots__ = ("desc", "fut", "involves", "outcomes")

    def __init__(self, desc: str, fut: Any, involves: set[int], value: Any) -> None:
        self.desc = desc
        self.fut = fut
        self.involves = involves  # processes whose death may end it
        self.outcomes: list[Any] = [value]


class _ChannelModel:
    """A RemoteChannel and what it must hold. Puts and takes that find a value are
    waited for at once, and at most one taker waits on an empty channel, so which
    take gets which value is known."""

    def __init__(self, rc: Any, owner: int, size: int) -> None:
        self.rc = rc
        self.owner = owner
        self.size = size
        self.values: deque[Any] = deque()
        self.taker: _Pending | None = None
        self.broken = False  # its state is unknown (a kill hit it): used no more


class Run:
    """One seeded run over `workers` (pids already in the cluster)."""

    def __init__(self, seed: int, workers: list[int], kills: int = 1,
                 interrupts: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workers = list(workers)
        self.kills_left = kills
        self.interrupts = interrupts
        self.pending: list[_Pending] = []
        self.channels: list[_ChannelModel] = []
        self.log: deque[str] = deque(maxlen=40)
        self.counter = itertools.count()
        self.added: list[int] = []  # workers this run started (to replace killed ones)
        self.nsteps = 0
        self.counts: dict[str, int] = {}  # steps taken, by kind

    # -- driving ------------------------------------------------------------------------

    def steps(self, n: int) -> None:
        ops: list[tuple[Callable[[], bool | None], int]] = [
            (self.op_call, 6), (self.op_nested, 3), (self.op_long, 2),
            (self.op_new_channel, 1), (self.op_put, 4), (self.op_take, 4),
            (self.op_map, 1), (self.op_drain, 2),
        ]
        if self.interrupts:
            ops.append((self.op_interrupt, 1))
        if self.kills_left:
            ops.append((self.op_kill, 1))
        funcs, weights = zip(*ops)
        try:
            for _ in range(n):
                self.nsteps += 1
                op = self.rng.choices(funcs, weights)[0]
                if op() is not False:  # (False: nothing to do in this state)
                    name = op.__name__[3:]
                    self.counts[name] = self.counts.get(name, 0) + 1
            self.op_drain()
        except ModelError:
            raise
        except BaseException as exc:
            raise self.fail(f"{type(exc).__name__}: {exc}") from exc

    def fail(self, what: str) -> ModelError:
        steps = "\n  ".join(self.log)
        return ModelError(f"seed {self.seed}, step {self.nsteps}: {what}\n"
                          f"last steps:\n  {steps}")

    def note(self, desc: str) -> None:
        self.log.append(f"{self.nsteps}: {desc}")

    def procs(self) -> list[int]:
        return [1, *self.workers]

    def value(self) -> int:
        return next(self.counter)

    def track(self, desc: str, fut: Any, involves: set[int], value: Any) -> None:
        self.pending.append(_Pending(desc, fut, involves, value))

    def settle(self, p: _Pending) -> None:
        """Wait (bounded) for a call in flight and check how it ended."""
        try:
            got = p.fut.fetch(timeout=STEP_SECONDS)
            outcome: Any = ("value", got)
        except TimeoutError:
            raise self.fail(f"{p.desc}: no answer within {STEP_SECONDS} s") from None
        except fd.ProcessExitedException as exc:
            outcome = ("exited", exc.worker_id)
        except fd.RemoteException as exc:
            cause = exc.__cause__
            if isinstance(cause, fd.ProcessExitedException):
                outcome = ("exited", cause.worker_id)
            else:
                outcome = ("raised", type(cause).__name__ if cause else repr(exc))
        if outcome in p.outcomes:
            return
        raise self.fail(f"{p.desc}: got {outcome}, expected one of {p.outcomes}")

    # -- the steps ------------------------------------------------------------------------

    def op_call(self) -> bool | None:
        t, x = self.rng.choice(self.procs()), self.value()
        fut = fd.remotecall(echo, t, x)
        self.note(f"echo {x} on {t}")
        self.track(f"echo {x} on {t}", fut, {t}, ("value", x))
        if self.rng.random() < 0.5:
            self.settle(self.pending.pop())

    def op_nested(self) -> bool | None:
        a = self.rng.choice(self.workers)
        b = self.rng.choice([p for p in self.procs() if p != a])
        x = self.value()
        self.note(f"nested {x}: {a} calls {b}")
        self.track(f"nested {x} via {a} to {b}", fd.remotecall(nested, a, b, x), {a, b},
                   ("value", x))

    def op_long(self) -> bool | None:
        t, x = self.rng.choice(self.procs()), self.value()
        seconds = self.rng.uniform(0.2, 1.0)
        fut = fd.remotecall(sleep_then, t, seconds, x)
        self.note(f"long {x} on {t} ({seconds:.2f} s)")
        if self.rng.random() < 0.5:
            try:
                fut.fetch(timeout=0.05)
            except TimeoutError:
                pass
            else:
                raise self.fail(f"long {x} on {t} answered within 0.05 s")
        self.track(f"long {x} on {t}", fut, {t}, ("value", x))

    def op_new_channel(self) -> bool | None:
        if len([c for c in self.channels if not c.broken]) >= 4:
            return False
        owner = self.rng.choice(self.procs())
        size = self.rng.choice([1, 8, 64])
        self.note(f"channel on {owner} (size {size})")
        self.channels.append(_ChannelModel(fd.RemoteChannel(lambda: fd.Channel(size), owner),
                                           owner, size))

    def _channel(self) -> _ChannelModel | None:
        live = [c for c in self.channels if not c.broken]
        return self.rng.choice(live) if live else None

    def op_put(self) -> bool | None:
        c = self._channel()
        if c is None:
            return False
        if len(c.values) >= c.size:
            return  # it would block: the model keeps to puts that return
        putter, v = self.rng.choice(self.procs()), self.value()
        self.note(f"put {v} from {putter} into channel on {c.owner}")
        fut = fd.remotecall(put_into, putter, c.rc, v)
        c.values.append(v)
        self.track(f"put {v} from {putter}", fut, {putter, c.owner}, ("value", v))
        if c.taker is not None:
            # The waiting taker gets the oldest value.
            c.taker.outcomes = [("value", c.values.popleft())]
            c.taker = None
        self.settle(self.pending.pop())

    def op_take(self) -> bool | None:
        c = self._channel()
        if c is None or c.taker is not None:
            return False
        taker = self.rng.choice(self.procs())
        fut = fd.remotecall(take_from, taker, c.rc)
        self.note(f"take on {taker} from channel on {c.owner}")
        if c.values:
            self.track(f"take on {taker}", fut, {taker, c.owner}, ("value", c.values.popleft()))
            self.settle(self.pending.pop())
        else:
            p = _Pending(f"take on {taker} (waiting)", fut, {taker, c.owner}, None)
            p.outcomes = []  # set by the put that feeds it
            self.pending.append(p)
            c.taker = p

    def op_map(self) -> bool | None:
        k = self.rng.randint(1, 60)
        batch = self.rng.choice([1, 2, "auto"])
        self.note(f"pmap of {k} (batch_size={batch})")
        got = _bounded(lambda: fd.pmap(exclusive, range(k), batch_size=batch))
        if got is None:
            raise self.fail(f"pmap of {k} did not return within {2 * STEP_SECONDS} s")
        if [x for _, x in got] != list(range(k)):
            raise self.fail(f"pmap returned {got}")
        for w in self.workers:
            n = fd.remotecall(overlaps_seen, w).fetch(timeout=STEP_SECONDS)
            if n:
                raise self.fail(f"{n} of a pool's calls overlapped on worker {w}")

    def op_drain(self) -> bool | None:
        self.note("drain")
        for c in self.channels:
            if c.taker is not None and not c.broken:
                v = self.value()
                self.note(f"put {v} from 1 for the waiting taker")
                c.rc.put(v, timeout=STEP_SECONDS)
                c.taker.outcomes = [("value", v)]
                c.taker = None
        while self.pending:
            self.settle(self.pending.pop(0))

    def op_interrupt(self) -> bool | None:
        self.op_drain()  # nothing else in flight: only the blocked call is hit
        w = self.rng.choice(self.workers)
        started = fd.RemoteChannel(lambda: fd.Channel(1), 1)
        fut = fd.remotecall(block_until_interrupted, w, started)
        self.note(f"interrupt on {w}")
        if started.take(timeout=STEP_SECONDS) != w:
            raise self.fail("the blocking call started elsewhere")
        if self.rng.random() < 0.5:
            time.sleep(self.rng.uniform(0, 0.05))
        fd.interrupt(w)
        self.settle(_Pending(f"interrupted call on {w}", fut, {w},
                             ("raised", "KeyboardInterrupt")))

    def op_kill(self) -> bool | None:
        if not self.kills_left or len(self.workers) < 2:
            return False
        self.kills_left -= 1
        w = self.rng.choice(self.workers)
        ospid = fd.remotecall(os.getpid, w).fetch(timeout=STEP_SECONDS)
        self.note(f"kill {w}")
        doomed = [p for p in self.pending if w in p.involves]
        for c in self.channels:
            # A channel it owned is gone; one it was waiting on keeps its take, now
            # orphaned on the owner, which will swallow the next value.
            if c.owner == w or (c.taker is not None and w in c.taker.involves):
                c.broken = True
                c.taker = None
        os.kill(ospid, signal.SIGKILL)
        deadline = time.monotonic() + STEP_SECONDS
        while w in fd.workers():
            if time.monotonic() > deadline:
                raise self.fail(f"worker {w} still a member {STEP_SECONDS} s after SIGKILL")
            time.sleep(0.02)
        self.workers.remove(w)
        # What involved it ends either way, in bounded time: its value, or the death.
        for p in doomed:
            self.pending.remove(p)
            try:
                p.fut.fetch(timeout=STEP_SECONDS)
            except TimeoutError:
                raise self.fail(f"{p.desc}: no answer within {STEP_SECONDS} s of the kill"
                                ) from None
            except (fd.ProcessExitedException, fd.RemoteException, fd.ChannelClosedError):
                pass
        new = fd.addprocs(1)
        self.added.extend(new)
        self.workers.extend(new)


def _bounded(fn: Callable[[], Any]) -> Any:
    """fn() on a thread of its own, given 2 * STEP_SECONDS; None if it did not return."""
    import threading

    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(2 * STEP_SECONDS)
    if errors:
        raise errors[0]
    return out[0] if out else None
