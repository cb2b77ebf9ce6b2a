"""Tests for Task, run_async and the sync block."""

from __future__ import annotations

import threading

import pytest

import fastdist.tasks as tasks
from fastdist.exceptions import CompositeException

Task, run_async, sync, register_sync = tasks.Task, tasks.run_async, tasks.sync, tasks.register_sync


def fail(exc: BaseException, gate: threading.Event | None = None) -> None:
    if gate is not None:
        assert gate.wait(5)
    raise exc


@pytest.mark.timeout(10)
def test_run_async_returns_value() -> None:
    t = run_async(lambda a, *, b: a + b, 2, b=3)
    assert t.result(timeout=5) == 5
    assert t.fetch() == 5
    assert t.done() and t.exception() is None
    assert "done" in repr(t)


@pytest.mark.timeout(10)
def test_failure_is_reraised_by_wait_and_result() -> None:
    err = KeyError("boom")
    t = run_async(fail, err)
    with pytest.raises(KeyError) as info:
        t.wait(timeout=5)
    assert info.value is err
    with pytest.raises(KeyError):
        t.result()
    assert t.exception() is err and t.done()
    assert "failed" in repr(t)


@pytest.mark.timeout(10)
def test_wait_timeout_leaves_task_running() -> None:
    gate = threading.Event()
    t = run_async(gate.wait, 5)
    with pytest.raises(TimeoutError):
        t.wait(timeout=0.05)
    with pytest.raises(TimeoutError):
        t.result(timeout=0)
    assert not t.done() and "runnable" in repr(t)
    gate.set()
    assert t.result(timeout=5) is True


@pytest.mark.timeout(10)
def test_task_starts_once_and_only_when_asked() -> None:
    ran = threading.Event()
    t = Task(ran.set)
    assert "created" in repr(t)
    with pytest.raises(TimeoutError):
        t.wait(timeout=0.05)
    assert not ran.is_set()
    assert t.start() is t
    t.wait(timeout=5)
    assert ran.is_set()
    with pytest.raises(RuntimeError):
        t.start()


@pytest.mark.timeout(10)
def test_sync_waits_for_every_task() -> None:
    go = threading.Event()
    finished: list[int] = []

    def work(i: int) -> None:
        assert go.wait(5)
        finished.append(i)

    with sync():
        for i in range(10):
            run_async(work, i)
        go.set()
    assert sorted(finished) == list(range(10))


@pytest.mark.timeout(10)
def test_sync_raises_all_failures_after_waiting_for_all() -> None:
    errors = [ValueError("a"), KeyError("b"), OSError("c")]
    slow_gate = threading.Event()
    with pytest.raises(CompositeException) as info, sync():
        run_async(fail, errors[0])
        slow = run_async(slow_gate.wait, 5)
        run_async(fail, errors[1])
        run_async(lambda: 42)
        run_async(fail, errors[2], slow_gate)
        slow_gate.set()
    assert list(info.value.exceptions) == errors  # same objects, registration order
    assert slow.done()


@pytest.mark.timeout(10)
def test_nested_sync_blocks_collect_their_own() -> None:
    inner_err = ValueError("inner")
    outer_gate = threading.Event()
    with sync():
        outer = run_async(outer_gate.wait, 5)
        with pytest.raises(CompositeException) as info, sync():
            run_async(fail, inner_err)
        outer_gate.set()
    # The outer block did not wait for (nor re-raise) the inner block's failure.
    assert list(info.value.exceptions) == [inner_err]
    assert outer.done()


@pytest.mark.timeout(10)
def test_body_exception_propagates_after_waiting() -> None:
    gate = threading.Event()
    task_err = KeyError("task")
    with pytest.raises(ZeroDivisionError) as info, sync():
        slow = run_async(fail, task_err, gate)
        gate.set()
        1 / 0
    assert slow.done()
    assert any("KeyError('task')" in note for note in info.value.__notes__)


@pytest.mark.timeout(10)
def test_tasks_started_by_tasks_register_to_the_block() -> None:
    body_done = threading.Event()
    child_err = RuntimeError("grandchild")
    children: list = []

    def parent() -> None:
        # Start the child only once the block is already waiting.
        assert body_done.wait(5)
        children.append(run_async(fail, child_err))

    with pytest.raises(CompositeException) as info, sync():
        run_async(parent)
        body_done.set()
    assert list(info.value.exceptions) == [child_err]
    assert children[0].done()


@pytest.mark.timeout(20)
def test_concurrent_registration_loses_nothing() -> None:
    count = 0
    lock = threading.Lock()

    def leaf() -> None:
        nonlocal count
        with lock:
            count += 1

    def spawner() -> None:
        for _ in range(30):
            run_async(leaf)

    with sync():
        for _ in range(20):
            run_async(spawner)
    assert count == 600


@pytest.mark.timeout(10)
def test_any_waitable_registers() -> None:
    class Failing:
        def wait(self) -> None:
            raise OSError("remote side gone")

    class Fine:
        waited = False

        def wait(self) -> None:
            Fine.waited = True

    register_sync(Failing())  # outside a block: ignored
    with pytest.raises(CompositeException) as info, sync():
        register_sync(Fine())
        register_sync(Failing())
    assert Fine.waited
    assert [type(e) for e in info.value.exceptions] == [OSError]


@pytest.mark.timeout(10)
def test_registration_after_block_ended_is_ignored() -> None:
    with sync():
        late = Task(lambda: run_async(lambda: None))  # copies the block's context
    assert late.start().result(timeout=5).result(timeout=5) is None
