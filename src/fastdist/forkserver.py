"""The fork server: one process with a worker's imports already done, forking each local worker.

A fresh interpreter costs 0.1-0.2 s of CPU before it can serve (start-up plus
`import fastdist`); a fork of a process that has paid it once costs a few
milliseconds. So the master starts one server, with its own interpreter,
environment and `sys.path`, on first need, and asks it for each local worker
(CPython's multiprocessing `forkserver` does the same for the same reason).

The master and the server talk over a private socketpair (SOCK_SEQPACKET:
one message per record, nothing on disk); every message is a JSON object:

    master -> server   {"op": "spawn", "seq", "bind", "separate_stderr", "env", "cwd"}
                         + SCM_RIGHTS: the worker's stdin, stdout, stderr pipe ends
                       {"op": "signal", "pid", "sig"}
    server -> master   {"ready": server pid}                 once, imports done
                       {"seq", "pid"} | {"seq", "error"}     per spawn, right after the fork
                       {"exit": pid, "code": returncode}     per worker, when reaped

1. The server has one thread, so forking is safe; it reaps its children
   (SIGCHLD wakes its select through a wakeup pipe) and reports each exit code.
2. The child makes the pipes its fds 0, 1, 2, takes the requested environment,
   directory and `sys.path`, and runs `fastdist.worker` as `python -m fastdist.worker`
   would: the cookie arrives on stdin, as with a fresh process.
3. Signals go through the server, which alone knows whether a pid is still its
   unreaped child (so a recycled pid is never signalled).
4. The server exits when the master's end of the socketpair closes, killing any
   worker that has not exited by itself within EXIT_GRACE_SECONDS (a worker that
   never joined would otherwise wait out FASTDIST_WORKER_TIMEOUT).
5. What a fork cannot give a worker is what the interpreter reads as it starts: its
   own str hash seed, and new PYTHON* or locale variables. A worker whose env= sets
   one of those is started as a fresh process (so is one with exename or exeflags).
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Generator
from typing import Any, NoReturn

FORKSERVER_ENV = "FASTDIST_FORKSERVER"
# Below the default AF_UNIX send buffer (about 208 KiB), which bounds one SEQPACKET
# record; a larger request (a huge env=) is started as a fresh process instead.
MAX_MESSAGE_NBYTES = 1 << 17
START_TIMEOUT = 30.0
SPAWN_TIMEOUT = 30.0
# Once the master is gone, how long workers get to notice it themselves before SIGKILL.
EXIT_GRACE_SECONDS = 1.0
# The exit code of a worker whose server died before reporting it: init reaped it, so
# nobody can know the real one.
UNKNOWN_EXIT_CODE = 255
# Read by the interpreter at start-up, so a forked worker cannot take a new value;
# a worker whose environment changes one of them is started as a fresh process.
STARTUP_LOCALE_VARS = ("LC_ALL", "LC_CTYPE", "LANG")
# What a worker imports after it starts, imported once here so no fork pays for it.
# Nothing that starts a thread or reads the environment at import (numpy, BLAS):
# OMP_NUM_THREADS and the like must be read in each worker, after its env is set.
PRELOAD = (
    "fastdist.workerproc", "fastdist.worker", "fastdist.transport", "fastdist.handlers",
    "fastdist.protocol.handshake", "fastdist.spawn", "fastdist.output",
    "fastdist.workerpool", "fastdist.pmap", "fastdist.tasks", "hmac", "secrets",
    "ctypes", "traceback", "linecache", "tokenize", "importlib.util",
)


class ForkServerError(RuntimeError):
    """The fork server could not start, or went away; the caller starts a fresh process."""


def enabled() -> bool:
    """False when FASTDIST_FORKSERVER=0 (read each time, so it can change at run time)."""
    return os.environ.get(FORKSERVER_ENV, "1").strip() != "0"


def _is_startup_var(key: str) -> bool:
    return (key.startswith("PYTHON") and key != "PYTHONPATH") or key in STARTUP_LOCALE_VARS


def _encode(msg: dict[str, Any]) -> bytes:
    # ensure_ascii escapes surrogate-escaped bytes of odd env values, which loads restores.
    return json.dumps(msg, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# -- the master's side ------------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the fork server, with the part of `subprocess.Popen` fastdist uses.

    `returncode` follows Popen: None while running, the exit status, or minus the
    signal that killed it; it is set when the server reports the worker reaped.
    """

    def __init__(self, server: ForkServer, args: list[str], stdout: Any, stderr: Any) -> None:
        self.args = args
        self.pid: int = 0
        self.stdin: Any = None  # the cookie was written and the pipe closed before the fork
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._server = server
        self._seq = 0  # the spawn request that started it
        self._spawned = threading.Event()
        self._spawn_error: str | None = None
        self._exited = threading.Event()

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def _set_returncode(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        """The exit code if the worker has exited, else None (never blocks)."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to exit; its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` seconds.
        """
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout if timeout is not None else 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the worker, unless it has exited (as Popen does)."""
        if self.returncode is None:
            self._server.send_signal(self.pid, int(sig))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The master's connection to its fork server."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket,
                 environ: dict[str, str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.environ = environ  # the server's start-up environment
        self.closed = False
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, ForkedProcess] = {}  # seq -> awaiting its pid
        self._live: dict[int, ForkedProcess] = {}  # pid -> not yet reported exited
        self._reader = threading.Thread(target=self._read, name="fastdist-forkserver",
                                        daemon=True)
        self._reader.start()

    def can_fork_with(self, env: dict[str, str]) -> bool:
        """Whether a forked worker can have environment `env` exactly as a fresh one would."""
        return all(env.get(k) == self.environ.get(k)
                   for k in {*env, *self.environ} if _is_startup_var(k))

    def spawn_many(self, n: int, cookie: bytes, *, bind: str, separate_stderr: bool,
                   env: dict[str, str], cwd: str, args: list[str]
                   ) -> Generator[ForkedProcess, None, None]:
        """Fork `n` workers; yield each handle, in order, once the server has forked it.

        Every request is sent before the first answer is awaited: the server forks
        back to back instead of waiting for this process to be scheduled between forks.

        Raises:
            ForkServerError: the request is too large, or the server is gone (after
                yielding the workers it did fork).
        """
        fields = {"bind": bind, "separate_stderr": separate_stderr, "env": env, "cwd": cwd}
        sent: list[ForkedProcess] = []
        nyielded = 0
        error: ForkServerError | None = None
        try:
            for _ in range(n):
                try:
                    sent.append(self._send_spawn(cookie, args, fields))
                except ForkServerError as exc:
                    error = exc
                    break
            for handle in sent:
                self._await_spawn(handle)
                nyielded += 1
                yield handle
            if error is not None:
                raise error
        finally:
            # Requests never answered, or abandoned: their worker, if forked, finds
            # nobody reading its stdout and exits.
            for handle in sent[nyielded:]:
                handle.stdout.close()
                handle.stderr.close()

    def _send_spawn(self, cookie: bytes, args: list[str],
                    fields: dict[str, Any]) -> ForkedProcess:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        theirs = [stdin_r, stdout_w, stderr_w]
        try:
            # A pipe holds 64 KiB, so the cookie never blocks; closing the write end
            # gives the worker EOF after it, exactly as a fresh process gets it.
            os.write(stdin_w, cookie)
        finally:
            os.close(stdin_w)
        # Outlive this call (the relay reads and closes them), as Popen's pipes do.
        stdout = open(stdout_r, "rb")  # noqa: SIM115
        stderr = open(stderr_r, "rb")  # noqa: SIM115
        handle = ForkedProcess(self, args, stdout, stderr)
        try:
            with self._lock:
                if self.closed:
                    raise ForkServerError("the fork server has exited")
                self._seq += 1
                handle._seq = self._seq
            msg = _encode({"op": "spawn", "seq": handle._seq, **fields})
            if len(msg) > MAX_MESSAGE_NBYTES:
                raise ForkServerError(f"a request of {len(msg)} bytes (the environment) is "
                                      f"over its limit of {MAX_MESSAGE_NBYTES}")
            with self._lock:
                self._pending[handle._seq] = handle
            try:
                socket.send_fds(self.sock, [msg], theirs)
            except OSError as exc:
                with self._lock:
                    self._pending.pop(handle._seq, None)
                raise ForkServerError(f"the fork server is gone ({exc})") from exc
        except BaseException:
            handle.stdout.close()
            handle.stderr.close()
            raise
        finally:
            # The server has its own copies once they are sent: ours would keep the
            # worker's pipes open after it exits, hiding the EOF the relay waits for.
            for fd in theirs:
                os.close(fd)
        return handle

    def _await_spawn(self, handle: ForkedProcess) -> None:
        if not handle._spawned.wait(SPAWN_TIMEOUT):
            with self._lock:
                self._pending.pop(handle._seq, None)
            raise ForkServerError(f"the fork server did not answer within {SPAWN_TIMEOUT:g} s")
        if handle._spawn_error is not None:
            raise ForkServerError(handle._spawn_error)

    def send_signal(self, pid: int, sig: int) -> None:
        """Signal worker `pid` through the server (directly, once the server is gone)."""
        if not self.closed:
            try:
                self.sock.send(_encode({"op": "signal", "pid": pid, "sig": sig}))
                return
            except OSError:
                pass
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE_NBYTES)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            if "seq" in msg:
                with self._lock:
                    handle = self._pending.pop(msg["seq"], None)
                    if handle is not None and "pid" in msg:
                        handle.pid = int(msg["pid"])
                        self._live[handle.pid] = handle
                if handle is not None:
                    handle._spawn_error = msg.get("error")
                    handle._spawned.set()
            elif "exit" in msg:
                with self._lock:
                    handle = self._live.pop(int(msg["exit"]), None)
                if handle is not None:
                    handle._set_returncode(int(msg["code"]))
        self._lost()

    def _lost(self) -> None:
        """The server is gone: fail waiting spawns, and watch its orphans ourselves."""
        with self._lock:
            self.closed = True
            pending, self._pending = self._pending, {}
            orphans, self._live = self._live, {}
        for handle in pending.values():
            handle._spawn_error = "the fork server exited"
            handle._spawned.set()
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if orphans:
            _watch_orphans(list(orphans.values()))


def _watch_orphans(handles: list[ForkedProcess]) -> None:
    """Report workers of a dead server as exited once they are gone (init reaps them)."""
    while handles:
        for handle in list(handles):
            try:
                os.kill(handle.pid, 0)
            except ProcessLookupError:
                handle._set_returncode(UNKNOWN_EXIT_CODE)
                handles.remove(handle)
            except PermissionError:
                pass
        time.sleep(0.1)


_state_lock = threading.Lock()
_server: ForkServer | None = None
_failure: str | None = None


def server_pid() -> int | None:
    """The pid of this process's fork server, if one is running."""
    server = _server
    return server.pid if server is not None and not server.closed else None


def get_server() -> ForkServer | None:
    """This process's fork server, started on first need; None if it cannot start.

    The first failure is said once on stderr; after it, workers start as fresh processes.
    """
    global _server, _failure
    with _state_lock:
        if _server is not None and not _server.closed:
            return _server
        if _failure is not None:
            return None
        try:
            _server = _start()
        except Exception as exc:  # noqa: BLE001 - any failure means: start fresh processes
            _server = None
            _failure = f"{type(exc).__name__}: {exc}"
            print(f"fastdist: the fork server could not start ({_failure}); "
                  "starting each worker as a fresh process.", file=sys.stderr, flush=True)
        return _server


def server_command() -> list[str]:
    return [sys.executable, "-S", "-m", "fastdist.forkserver"]


def _start() -> ForkServer:
    environ = dict(os.environ)
    path = [p if p else os.getcwd() for p in sys.path]
    environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen([*server_command(), str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, env=environ)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        ours.settimeout(START_TIMEOUT)
        try:
            data = ours.recv(MAX_MESSAGE_NBYTES)
        except TimeoutError:
            raise ForkServerError(f"no answer within {START_TIMEOUT:g} s") from None
        if not data:
            code = proc.wait(timeout=5)
            raise ForkServerError(f"it exited with code {code}")
        if json.loads(data).get("ready") != proc.pid:
            raise ForkServerError(f"unexpected greeting {data[:100]!r}")
        ours.settimeout(None)
    except BaseException:
        ours.close()
        proc.kill()
        proc.wait()
        raise
    return ForkServer(proc, ours, environ)


def _forget_in_child() -> None:
    """In a process forked from the master: the server is the parent's, not ours.

    Closing (never shutting down) our copy of the socket leaves the parent's link intact.
    """
    global _server, _state_lock
    _state_lock = threading.Lock()
    server, _server = _server, None
    if server is not None:
        try:
            server.sock.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_in_child)


# -- the server's side ------------------------------------------------------------------------


class _Server:
    """The fork server's state: one thread, its control socket and its children."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # sys.path as the interpreter built it: [cwd, *PYTHONPATH, *the interpreter's own];
        # a worker gets the same shape with its own directory and PYTHONPATH.
        npath = len(_pythonpath_entries(os.environ.get("PYTHONPATH", "")))
        self.path_tail = sys.path[1 + npath:]

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, _ignore_signal)
        self.send({"ready": os.getpid()})
        while True:
            readable, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
            if self.wake_r in readable:
                _drain(self.wake_r)
            self.reap()
            if self.sock.fileno() in readable:
                try:
                    data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE_NBYTES, 3)
                except OSError:
                    data, fds = b"", []
                if not data:
                    for fd in fds:
                        os.close(fd)
                    break
                self.handle(json.loads(data), fds)
        self.shutdown()

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.send(_encode(msg))
        except OSError:
            pass  # the master is gone; the select loop sees it next

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "signal":
            # Only an unreaped child: a pid we reaped may already belong to someone else.
            if msg["pid"] in self.children:
                try:
                    os.kill(msg["pid"], msg["sig"])
                except ProcessLookupError:
                    pass
        elif op == "spawn":
            try:
                if len(fds) != 3:
                    self.send({"seq": msg["seq"], "error": f"expected 3 fds, got {len(fds)}"})
                    return
                if _nthreads() != 1:
                    self.send({"seq": msg["seq"], "error": "the fork server has threads"})
                    return
                pid = os.fork()
                if pid == 0:
                    self.become_worker(msg, fds)
                self.children.add(pid)
                self.send({"seq": msg["seq"], "pid": pid})
            except OSError as exc:
                self.send({"seq": msg["seq"], "error": f"fork failed: {exc}"})
            finally:
                for fd in fds:
                    os.close(fd)

    def become_worker(self, msg: dict[str, Any], fds: list[int]) -> None:
        """In the child: turn into `python -m fastdist.worker`; never returns."""
        run_child(lambda: self._worker_main(msg, fds))

    def _worker_main(self, msg: dict[str, Any], fds: list[int]) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        try:
            os.chdir(msg["cwd"])
        except OSError as exc:
            print(f"fastdist worker: cannot enter {msg['cwd']!r}: {exc}", file=sys.stderr,
                  flush=True)
            raise SystemExit(1) from None
        # os.environ's clear/update call unsetenv/putenv, so C libraries (BLAS) see it too.
        os.environ.clear()
        os.environ.update(msg["env"])
        cwd = os.getcwd()
        sys.path[:] = [cwd, *_pythonpath_entries(msg["env"].get("PYTHONPATH", "")),
                       *self.path_tail]
        # Directory listings cached by this server may predate files the master made.
        importlib.invalidate_caches()
        worker = _become_main("fastdist.worker")
        sys.argv[:] = [str(worker.__file__), "--bind-to", msg["bind"],
                       *(["--separate-stderr"] if msg["separate_stderr"] else [])]
        worker.main(sys.argv[1:])

    def shutdown(self) -> None:
        """The master is gone: give workers a moment to see it, then kill and reap the rest."""
        self.sock.close()
        deadline = time.monotonic() + EXIT_GRACE_SECONDS
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _nthreads() -> int:
    """Threads in this process, native ones included (a library may start its own)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _pythonpath_entries(pythonpath: str) -> list[str]:
    """PYTHONPATH as the interpreter adds it to sys.path: made absolute, '' as the cwd."""
    if not pythonpath:
        return []
    return [os.path.abspath(p) for p in pythonpath.split(os.pathsep)]


def run_child(body: Callable[[], None]) -> NoReturn:
    """In a forked child: run `body`, then end the process with its exit code (0,
    or SystemExit's; 1 after printing any other exception). Never returns: a child
    must not fall back into its parent's loop."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - printed; the child ends either way
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_main(module: str) -> types.ModuleType:
    """Give `__main__` the names `python -m module` would, not the fork server's; the module."""
    import builtins

    mod = importlib.import_module(module)
    main = types.ModuleType("__main__")
    main.__dict__.update({k: v for k, v in vars(mod).items() if not k.startswith("__")})
    main.__dict__.update(__file__=mod.__file__, __spec__=mod.__spec__, __loader__=mod.__loader__,
                         __package__=mod.__package__, __builtins__=builtins)
    sys.modules["__main__"] = main
    return mod


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD's handler: the wakeup fd, not this, is what wakes the loop."""


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def serve(fd: int) -> None:
    """Run the fork server on control socket `fd` until the master closes it."""
    # Ctrl-C reaches the whole process group; it is for the master and its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    for name in PRELOAD:
        importlib.import_module(name)
    # Objects imported so far live for good: keep the collector off their pages, so the
    # children share them instead of copying them on the first collection.
    gc.collect()
    gc.freeze()
    _Server(sock).run()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m fastdist.forkserver FD (started by fastdist itself)",
              file=sys.stderr)
        sys.exit(errno.EINVAL)
    serve(int(args[0]))


if __name__ == "__main__":
    main()
