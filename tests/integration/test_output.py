"""Worker output and logging reach the master: `From worker N:` lines, forwarded records."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
from support import collect_printed, read_until

import fastdist as fd

pytestmark = pytest.mark.timeout(60)


def say(text, stream="stdout"):
    print(text, file=getattr(sys, stream))


def say_lines(lines):
    for line in lines:
        print(line)


def say_then_exit(text):
    print(text)
    print(f"{text} (stderr)", file=sys.stderr)
    os._exit(0)


def log_on_worker(name, level, msg, *args):
    logging.getLogger(name).log(level, msg, *args)


def log_exception_on_worker(name):
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger(name).exception("division failed")


def test_worker_stdout_reaches_master_stdout_prefixed(two_workers):
    w = two_workers[0]
    with collect_printed() as printed:
        fd.remotecall_fetch(say, w, "hello from the worker")
        seen = printed.wait_for("hello from the worker")
    assert f"From worker {w}:\thello from the worker\n" in seen["out"]
    assert "hello from the worker" not in seen["err"]


def test_worker_stderr_reaches_master_stderr_prefixed(two_workers):
    w = two_workers[1]
    with collect_printed() as printed:
        fd.remotecall_fetch(say, w, "a warning line", "stderr")
        seen = printed.wait_for("a warning line", "err")
    assert f"From worker {w}:\ta warning line\n" in seen["err"]
    assert "a warning line" not in seen["out"]


def test_relay_works_with_capsys(two_workers, capsys):
    w = two_workers[0]
    fd.remotecall_fetch(say, w, "seen by capsys")
    seen = read_until(capsys, "seen by capsys")
    assert f"From worker {w}:\tseen by capsys" in seen["out"]


def test_every_line_is_prefixed_and_in_order(two_workers):
    w = two_workers[0]
    lines = [f"line {i}" for i in range(200)]
    with collect_printed() as printed:
        fd.remotecall_fetch(say_lines, w, lines)
        seen = printed.wait_for("line 199")
    relayed = [ln for ln in seen["out"].splitlines() if ln.startswith(f"From worker {w}:")]
    assert relayed == [f"From worker {w}:\t{line}" for line in lines]


def test_output_of_a_call_is_printed_before_the_call_returns(two_workers, capfd):
    # The line travels on a pipe, the reply on a socket: the caller prints what the
    # pipe holds before it returns the reply, so no wait is needed here.
    w = two_workers[0]
    for i in range(100):
        fd.remotecall_fetch(say, w, f"fetched {i}")
        assert f"From worker {w}:\tfetched {i}\n" in capfd.readouterr().out
    for i in range(50):
        fd.remotecall_wait(say, w, f"waited {i}", "stderr")
        assert f"From worker {w}:\twaited {i}\n" in capfd.readouterr().err
    for i in range(50):
        fd.remotecall(say, w, f"fetched later {i}").fetch()
        assert f"fetched later {i}" in capfd.readouterr().out


def test_output_before_an_awaited_result(two_workers, capfd):
    import asyncio

    async def main():
        for i in range(30):
            await fd.remotecall(say, two_workers[1], f"awaited {i}")
            assert f"awaited {i}" in capfd.readouterr().out

    asyncio.run(main())


def test_line_printed_just_before_exit_arrives(cluster):
    (w,) = cluster.add(1)
    with collect_printed() as printed:
        fd.remote_do(say_then_exit, w, "last words")
        printed.wait_for("last words (stderr)", "err")
        seen = printed.wait_for("last words")
    assert f"From worker {w}:\tlast words\n" in seen["out"]
    assert f"From worker {w}:\tlast words (stderr)\n" in seen["err"]
    deadline = time.monotonic() + 20
    while w in fd.workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w not in fd.workers()


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def app_logger():
    logger = logging.getLogger("fastdist_test_app")
    handler = ListHandler()
    handler.setFormatter(logging.Formatter("[%(worker)s] %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def wait_for_records(handler, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(handler.records) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return handler.records


def test_worker_log_record_reaches_master_handler_with_worker_id(two_workers, app_logger):
    _, handler = app_logger
    w = two_workers[1]
    fd.remotecall_fetch(log_on_worker, w, "fastdist_test_app", logging.WARNING,
                        "disk %s is %d%% full", "/data", 93)
    (record,) = wait_for_records(handler, 1)
    assert record.worker == w
    assert record.getMessage() == "disk /data is 93% full"
    assert record.levelno == logging.WARNING
    assert record.name == "fastdist_test_app"
    assert record.process != os.getpid()
    assert handler.lines == [f"[{w}] WARNING fastdist_test_app: disk /data is 93% full"]


def test_records_of_a_call_are_handled_before_the_call_returns(two_workers, app_logger):
    _, handler = app_logger
    w = two_workers[0]
    for i in range(100):
        fd.remotecall_fetch(log_on_worker, w, "fastdist_test_app", logging.WARNING, "n=%d", i)
        assert handler.records and handler.records[-1].getMessage() == f"n={i}"
    assert [r.getMessage() for r in handler.records] == [f"n={i}" for i in range(100)]


def test_master_records_have_worker_field_too(app_logger):
    logger, handler = app_logger
    logger.warning("on the master")
    assert handler.lines == ["[1] WARNING fastdist_test_app: on the master"]


def test_records_from_several_workers(two_workers, app_logger):
    _, handler = app_logger
    for w in two_workers:
        fd.remotecall_fetch(log_on_worker, w, "fastdist_test_app", logging.ERROR, "from %d", w)
    records = wait_for_records(handler, 2)
    assert sorted((r.worker, r.getMessage()) for r in records) == [
        (w, f"from {w}") for w in sorted(two_workers)]


def test_worker_exception_log_carries_traceback_text(two_workers, app_logger):
    _, handler = app_logger
    fd.remotecall_fetch(log_exception_on_worker, two_workers[0], "fastdist_test_app")
    (record,) = wait_for_records(handler, 1)
    assert record.worker == two_workers[0]
    assert "ZeroDivisionError" in handler.lines[0]
    assert "division failed" in handler.lines[0]


def test_records_below_master_level_are_not_handled(two_workers, app_logger):
    logger, handler = app_logger
    logger.setLevel(logging.ERROR)
    w = two_workers[0]
    fd.remotecall_fetch(log_on_worker, w, "fastdist_test_app", logging.WARNING, "quiet")
    fd.remotecall_fetch(log_on_worker, w, "fastdist_test_app", logging.ERROR, "loud")
    records = wait_for_records(handler, 1)
    time.sleep(0.2)
    assert [r.getMessage() for r in records] == ["loud"]


# -- at the master's exit -----------------------------------------------------------------

ENDS_AT_ONCE = """
import logging, sys, time
import fastdist as fd

logging.basicConfig(format="%(levelname)s worker=%(worker)s %(message)s", stream=sys.stdout)
fd.addprocs(2)

def log_it():
    import logging
    logging.getLogger("science").warning("logged at the end")

def busy(seconds):
    print("started", flush=True)
    time.sleep(seconds)
    print("never printed")

if sys.argv[1] == "busy":
    fd.remote_do(busy, 3, 60)
fd.remote_do(print, 2, "hello")
fd.remote_do(print, 3, "no newline", end="")
fd.remote_do(log_it, 2)
"""


def run_script(tmp_path, *args: str, env: dict[str, str] | None = None):
    import subprocess

    script = tmp_path / "ends_at_once.py"
    script.write_text(ENDS_AT_ONCE)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})},
                            check=False)
    return result, time.monotonic() - start


@pytest.mark.timeout(120)
def test_what_workers_print_and_log_as_the_script_ends_is_not_lost(tmp_path):
    for _ in range(3):  # it used to be lost every time
        result, _ = run_script(tmp_path, "quiet")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert "From worker 2:\thello" in lines, result.stdout
        assert "From worker 3:\tno newline" in lines, result.stdout
        assert "WARNING worker=2 logged at the end" in lines, result.stdout


@pytest.mark.timeout(120)
def test_a_call_still_running_at_exit_delays_it_only_by_the_grace(tmp_path):
    result, seconds = run_script(tmp_path, "busy", env={"FASTDIST_EXIT_GRACE": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "From worker 3:\tstarted" in lines and "From worker 2:\thello" in lines, lines
    assert not any("never printed" in line for line in lines)
    # The grace (1 s) and the start of two workers, not the call's 60 s.
    assert seconds < 30, seconds
