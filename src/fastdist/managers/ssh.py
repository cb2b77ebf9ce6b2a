"""SSHManager: workers on other machines, started over ssh (Julia's `addprocs(machines)`).

Port of Distributed.jl `managers.jl` (`SSHManager`). Each worker is one ssh
session running `python -m fastdist.worker`: the cookie goes down ssh's stdin
(never into a command line), the worker's address line comes back on ssh's
stdout (the `WorkerConfig.io`), and ssh's stderr stays a separate pipe whose
lines the master relays as the worker's stderr. With `tunnel=True` the master
reaches each worker through an `ssh -L` forward on localhost; with
`multiplex=True` all sessions to a host share one ssh connection (ControlMaster).
With `one_session=True` a host's workers share one session instead: it runs
`python -m fastdist.worker --count N`, which forks them (`fastdist.hostspawn`), and
their output comes back labelled and is split per worker (`managers.labelled`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from fastdist import node as _node
from fastdist.exceptions import ClusterError, ProcessExitedException
from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.managers.labelled import LabelledOutput, wait_reported
from fastdist.managers.process import BLAS_THREAD_VARS, escalate_exit, send_cookie
from fastdist.managers.sshhost import (
    Machine,
    bracket,
    is_ip,
    parse_machine,
    resolvable,
    ssh_hostname,
)
from fastdist.managers.sshsession import ERROR_TAIL_NBYTES, ControlMaster, StderrRelay, read_tail

# Julia's default: sshd's MaxStartups lets 10 unauthenticated connections in at once.
DEFAULT_MAX_PARALLEL = 10
# Variables a remote worker gets from the master unless `env` says otherwise
# (Julia passes JULIA_WORKER_TIMEOUT the same way).
FORWARDED_VARIABLES = ("FASTDIST_WORKER_TIMEOUT", "FASTDIST_HEARTBEAT_TIMEOUT")


def _flags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _worker_timeout() -> float:
    return _node.worker_timeout()


class SSHManager(ClusterManager):
    """Launch workers on other machines over ssh (Julia's `SSHManager`).

    `addprocs(machines, **kw)` builds one of these. Each machine is a string
    `"[user@]host[:port] [bind_addr[:port]]"` (one worker) or a tuple
    `(spec, count)` where count is a number or `"auto"` (one worker per CPU of
    that host, counted over ssh). Repeated specs add up.

    Keywords (through `addprocs`): `tunnel` (reach workers through `ssh -L`
    forwards on localhost), `multiplex` (share one ssh connection per host),
    `one_session` (one ssh session per host, which forks that host's workers from
    one interpreter: much faster for many workers per host; see `fastdist.hostspawn`),
    `sshflags` (extra ssh arguments, a string or a sequence), `max_parallel`
    (ssh launches in flight per host, default 10), `ssh` (the ssh program),
    `dir` (working directory; default: the master's, when it exists there),
    `exename` (default: this interpreter's path), `exeflags`, `env`
    (exported in the remote command line), `enable_threaded_blas`, `topology`, `lazy`.

    The worker listens on `bind_addr` when the spec has one, else on `host`
    when it is an IP address; a host given by name gets a worker listening on
    all interfaces, reached from the master and from the other workers alike at
    the machine ssh goes to for that name (`ssh -G`, with `sshflags`: an alias
    of the ssh configuration is reached at its `HostName`), or at the address the
    worker reports when this machine cannot look that name up.

    Args:
        machines: machine specifications, as above.

    Raises:
        ValueError: a malformed specification or count.

    Example:
        >>> fd.addprocs(["alice@node1", ("node2", 4), ("node3:2222", "auto")],
        ...             sshflags=("-i", "~/.ssh/cluster_key"), env={"PYTHONPATH": "/srv/app"})
        [2, 3, 4, 5, 6, 7, 8]
    """

    keywords = frozenset({"tunnel", "multiplex", "sshflags", "max_parallel", "ssh",
                          "one_session"})

    def __init__(self, machines: Any) -> None:
        if isinstance(machines, str):
            machines = [machines]
        elif (isinstance(machines, tuple) and len(machines) == 2
              and isinstance(machines[0], str) and _is_count(machines[1])):
            machines = [machines]  # addprocs(("host", 4)): one machine with a count
        self.machines: dict[str, int | str] = {}
        for m in machines:
            if isinstance(m, (tuple, list)):
                if len(m) != 2:
                    raise ValueError(f"a machine with a count is (spec, count), not {m!r}")
                spec, count = m
            else:
                spec, count = m, 1
            if not _is_count(count):
                raise ValueError(f"the worker count for {spec!r} must be a non-negative "
                                 f"integer or 'auto', not {count!r}")
            parsed = parse_machine(spec)
            before = self.machines.get(spec, 0)
            if count == "auto" or before == "auto":
                self.machines[spec] = "auto"
            else:
                self.machines[spec] = int(before) + int(count)
            n = self.machines[spec]
            if parsed.bind_port is not None and (n == "auto" or int(n) > 1):
                raise ValueError(f"{spec!r} names a bind port: only one worker can listen on it")
        self._lock = threading.Lock()
        self._masters: dict[str, ControlMaster] = {}
        self._control_dir: str | None = None
        self._tunnels: dict[int, tuple[Any, str]] = {}  # pid -> (ssh process or None, forward)
        self._tunnel_sems: dict[str, threading.Semaphore] = {}
        self._pids: dict[int, int] = {}  # id(config) -> pid, once registered
        self._stderr: dict[int, StderrRelay] = {}  # id(config) -> its session's stderr
        self._exiting: set[int] = set()  # pids asked to exit: their session ending is no news
        self._hostnames: dict[str, str] = {}  # spec -> the machine ssh goes to (`ssh -G`)
        self._resolvable: dict[str, bool] = {}  # name -> whether this machine can look it up

    def __repr__(self) -> str:
        return f"SSHManager(machines={self.machines!r})"

    # -- launching --------------------------------------------------------------------

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Start every machine's workers, machines in parallel; raise naming each bad host."""
        from concurrent.futures import ThreadPoolExecutor

        errors: list[str] = []
        items = list(self.machines.items())
        if not items:
            return
        self._remote_environment(params)  # a bad variable name fails before any login
        with ThreadPoolExecutor(max_workers=len(items),
                                thread_name_prefix="fastdist-ssh-launch") as pool:
            futures = [pool.submit(self._launch_on_machine, parse_machine(spec), count, params,
                                   launched, launch_ntfy) for spec, count in items]
            for f in futures:
                errors.extend(f.result())
        if errors:
            raise ClusterError("; ".join(errors))

    def _launch_on_machine(self, machine: Machine, count: int | str, params: dict[str, Any],
                           launched: list[WorkerConfig],
                           launch_ntfy: threading.Condition) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        self._find_hostname(machine, params)
        try:
            flags = self._ssh_flags(machine, params)
            if count == "auto":
                count = self._count_cpus(machine, flags, params)
        except ClusterError as exc:
            return [str(exc)]
        max_parallel = int(params.get("max_parallel") or DEFAULT_MAX_PARALLEL)
        if max_parallel < 1:
            return [f"max_parallel must be at least 1, not {max_parallel}"]
        one_session = bool(params.get("one_session")) and int(count) > 1
        command = self._remote_command(machine, params, int(count) if one_session else 1)
        argv = [params.get("ssh") or "ssh", "-T", "-a", "-x", *flags,
                "-o", "ClearAllForwardings=yes", machine.destination, command]
        results: list[str | None] = []
        if one_session:
            results = [self._launch_session(machine, int(count), argv, flags, params,
                                            launched, launch_ntfy)]
        elif count:
            with ThreadPoolExecutor(max_workers=min(max_parallel, int(count)),
                                    thread_name_prefix="fastdist-ssh") as pool:
                results = list(pool.map(
                    lambda _: self._launch_one(machine, argv, flags, params, launched,
                                               launch_ntfy), range(int(count))))
        path = _control_path_in(flags)
        if path is not None:
            self._hold_master(path, 0)  # no session started: close it now
        failed = [r for r in results if r is not None]
        if not failed:
            return []
        more = f" ({len(failed)} of {count} launches there failed)" if len(failed) > 1 else ""
        return [failed[0] + more]

    def _find_hostname(self, machine: Machine, params: dict[str, Any]) -> None:
        """Ask ssh which machine a host name stands for (an alias's HostName)."""
        if is_ip(machine.host) or machine.host == "localhost":
            return
        hostname = ssh_hostname(params.get("ssh") or "ssh", _login_flags(machine, params),
                                machine.destination, _worker_timeout())
        with self._lock:
            self._hostnames[machine.spec] = hostname or machine.host

    def _where(self, machine: Machine) -> str:
        """A machine as errors name it: as the user wrote it, and where ssh goes for it."""
        with self._lock:
            hostname = self._hostnames.get(machine.spec)
        named = hostname is not None and hostname.lower() != machine.host.lower()
        also = f", HostName {hostname}" if named else ""
        return f"{machine.host!r} ({machine.spec!r}{also})"

    def _ssh_flags(self, machine: Machine, params: dict[str, Any]) -> list[str]:
        """The user's sshflags, the spec's port, and (multiplex) the shared connection."""
        # The user's flags beat the defaults after them (an unreachable host is an error
        # after FASTDIST_WORKER_TIMEOUT, not a two-minute hang).
        flags = _login_flags(machine, params)
        flags += ["-o", f"ConnectTimeout={max(1, int(_worker_timeout()))}"]
        if params.get("multiplex"):
            path = self._control_master(machine, flags, params)
            flags += ["-o", "ControlMaster=no", "-o", f"ControlPath={path}"]
        return flags

    def _control_master(self, machine: Machine, flags: list[str], params: dict[str, Any]) -> str:
        key = f"{machine.destination} {' '.join(flags)}"
        with self._lock:
            master = self._masters.get(key)
            if master is not None and master.proc.poll() is None:
                return master.path
            if self._control_dir is None:
                # short: a Unix socket path is limited to ~100 bytes
                self._control_dir = tempfile.mkdtemp(prefix="fd-ssh-")
            path = os.path.join(self._control_dir, f"cm{len(self._masters)}")
            master = ControlMaster(params.get("ssh") or "ssh", flags, machine.destination, path)
            self._masters[key] = master
        try:
            master.wait_ready(_worker_timeout())
        except ClusterError as exc:
            with self._lock:
                if self._masters.get(key) is master:
                    del self._masters[key]
                if not self._masters and self._control_dir is not None:
                    shutil.rmtree(self._control_dir, ignore_errors=True)
                    self._control_dir = None
            raise ClusterError(f"cannot open an ssh connection to {self._where(machine)}: "
                               f"{exc}") from None
        return master.path

    def _count_cpus(self, machine: Machine, flags: list[str], params: dict[str, Any]) -> int:
        exename = str(params.get("exename") or sys.executable)
        probe = f"exec {shlex.quote(exename)} -c 'import os; print(os.cpu_count())'"
        argv = [params.get("ssh") or "ssh", "-T", "-a", "-x", *flags,
                machine.destination, "sh -c " + shlex.quote(probe)]
        try:
            proc = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=_worker_timeout() + 5, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"counting the CPUs of {self._where(machine)} over ssh timed "
                               "out") from None
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0 or not out.isdigit():
            why = proc.stderr.decode(errors="replace").strip()[-ERROR_TAIL_NBYTES:]
            raise ClusterError(f"cannot count the CPUs of {self._where(machine)} over ssh "
                               f"(exit code {proc.returncode}): {why or out!r}")
        return int(out)

    def _remote_command(self, machine: Machine, params: dict[str, Any], count: int) -> str:
        """The POSIX shell command ssh runs: cd, exports, exec the worker (or, for
        `count` > 1, the launcher that forks `count` of them)."""
        exename = str(params.get("exename") or sys.executable)
        exeflags = _flags(params.get("exeflags"))
        host, port = _listen_on(machine)
        bind = bracket(host) + (f":{port}" if port is not None else "")
        worker = " ".join(shlex.quote(a) for a in (
            exename, *exeflags, "-m", "fastdist.worker", "--bind-to", bind, "--separate-stderr",
            *(["--count", str(count)] if count > 1 else [])))
        lines = []
        directory = params.get("dir")
        if directory is not None:
            lines.append(f"cd -- {shlex.quote(str(directory))} || exit 1")
        else:
            # like Julia: the master's directory, on machines sharing its file system
            lines.append(f"cd -- {shlex.quote(os.getcwd())} 2>/dev/null")
        for name, value in self._remote_environment(params).items():
            lines.append(f"export {name}={shlex.quote(value)}")
        lines.append(f"exec {worker}")
        return "sh -c " + shlex.quote("\n".join(lines))

    def _remote_environment(self, params: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for name in FORWARDED_VARIABLES:
            if name in os.environ:
                env[name] = os.environ[name]
        if not params.get("enable_threaded_blas"):
            for name in BLAS_THREAD_VARS:
                env[name] = "1"
        user_env = {str(k): str(v) for k, v in dict(params.get("env") or {}).items()}
        env.update(user_env)
        # A source checkout of fastdist (not an installed one) is offered to the remote
        # interpreter after the user's path: on a shared file system it needs no install,
        # elsewhere the path does not exist and Python skips it.
        source = _fastdist_source_dir()
        if source is not None:
            user_path = user_env.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (user_path, source) if p)
        for name in env:
            if not (name.isascii() and name.isidentifier()):
                raise ValueError(f"invalid environment variable name {name!r}")
        return env

    def _launch_one(self, machine: Machine, argv: list[str], flags: list[str],
                    params: dict[str, Any], launched: list[WorkerConfig],
                    launch_ntfy: threading.Condition) -> str | None:
        """Start one ssh session; wait until its worker reports. Returns an error or None."""
        # ssh's stderr is read here, not by the framework: before the worker joins it
        # explains a failed launch, afterwards it is the worker's stderr.
        proc, err_r = _start_session(argv)
        stderr = StderrRelay(err_r)
        send_cookie(proc, params["cookie"])  # down ssh's stdin to the remote worker
        config = self._worker_config(machine, flags, params, proc, proc.stdout)
        with self._lock:
            self._stderr[id(config)] = stderr
        self._watch([config], proc)
        with launch_ntfy:
            launched.append(config)
            launch_ntfy.notify_all()
        # The launch counts as in flight (for max_parallel) until its address line is
        # read; the framework sets config.port when it is.
        if wait_reported([config], proc):
            return None
        if proc.poll() is None:
            return (f"no worker reported from {self._where(machine)} within "
                    f"{_worker_timeout():g} s (FASTDIST_WORKER_TIMEOUT)")
        return _describe_ssh_failure(self._where(machine), proc.returncode,
                                     stderr.early_text())

    def _launch_session(self, machine: Machine, count: int, argv: list[str],
                        flags: list[str], params: dict[str, Any], launched: list[WorkerConfig],
                        launch_ntfy: threading.Condition) -> str | None:
        """Start one ssh session whose launcher forks the host's `count` workers
        (`one_session`); wait until they report. Returns an error or None."""
        # The session's stderr carries all of its workers' stderr, labelled.
        proc, err_r = _start_session(argv)
        send_cookie(proc, params["cookie"])  # the launcher reads it once, for all
        assert proc.stdout is not None
        output = LabelledOutput(proc.stdout, open(err_r, "rb"), count,  # noqa: SIM115
                                "fastdist-ssh-session")
        configs = [self._worker_config(machine, flags, params, proc, output.streams[task],
                                       task=task, session=output)
                   for task in range(count)]
        self._watch(configs, proc)
        with launch_ntfy:
            launched.extend(configs)
            launch_ntfy.notify_all()
        reported = wait_reported(configs, proc)
        if reported == count:
            return None
        if proc.poll() is None:
            threading.Thread(target=escalate_exit, args=(proc, 0.0), daemon=True).start()
            return (f"{count - reported} of {count} workers did not report from "
                    f"{self._where(machine)} within {_worker_timeout():g} s "
                    f"(FASTDIST_WORKER_TIMEOUT){output.said()}")
        return _describe_ssh_failure(self._where(machine), proc.returncode,
                                     output.said().removeprefix("; it said: "))

    def _worker_config(self, machine: Machine, flags: list[str], params: dict[str, Any],
                       proc: subprocess.Popen[bytes], io: Any, **userdata: Any) -> WorkerConfig:
        with self._lock:
            hostname = self._hostnames.get(machine.spec)
        return WorkerConfig(
            io=io, process=proc, ospid=None, host=machine.host,
            bind_addr=machine.bind_addr, tunnel=bool(params.get("tunnel")),
            multiplex=bool(params.get("multiplex")), sshflags=tuple(flags), count=1,
            max_parallel=int(params.get("max_parallel") or DEFAULT_MAX_PARALLEL),
            exename=params.get("exename"), exeflags=params.get("exeflags"),
            environ=params.get("env"), enable_threaded_blas=params.get("enable_threaded_blas"),
            userdata={"machine": machine.spec, "destination": machine.destination,
                      "ssh": params.get("ssh") or "ssh", "listen": _listen_on(machine)[0],
                      "hostname": hostname if machine.bind_addr is None else None,
                      **userdata})

    def _watch(self, configs: list[WorkerConfig], proc: subprocess.Popen[bytes]) -> None:
        """Hold the host's shared connection for this session, and watch the session."""
        path = _control_path(configs[0])
        if path is not None:
            self._hold_master(path, +1)
        threading.Thread(target=self._watch_session, args=(configs, proc),
                         name="fastdist-ssh-watch", daemon=True).start()

    # -- connecting ----------------------------------------------------------------------

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """A TCP socket to the worker: directly, or through an ssh forward (tunnel=True)."""
        self._choose_address(config)
        if not config.tunnel:
            return super().connect(pid, config)
        sem = self._tunnel_semaphore(config)
        with sem:
            sock = self._connect_through_tunnel(pid, config)
        return sock, sock

    def _choose_address(self, config: WorkerConfig) -> None:
        """Reach a worker started by host name at the machine ssh went to for that name
        (it listens on all interfaces there), so that an alias only ssh knows works too;
        at the address the worker reported when this machine cannot look that name up
        (a HostName behind a jump host). With a tunnel, only the other workers use it."""
        userdata = config.userdata if isinstance(config.userdata, dict) else {}
        hostname = userdata.get("hostname")
        if hostname is None:
            return
        with self._lock:
            known = self._resolvable.get(hostname)
        if known is None:
            known = resolvable(hostname)
            with self._lock:
                self._resolvable[hostname] = known
        if known:
            config.bind_addr = hostname

    def _tunnel_semaphore(self, config: WorkerConfig) -> threading.Semaphore:
        key = str(config.userdata.get("destination", config.host))
        with self._lock:
            sem = self._tunnel_sems.get(key)
            if sem is None:
                sem = self._tunnel_sems[key] = threading.Semaphore(
                    int(config.max_parallel or DEFAULT_MAX_PARALLEL))
            return sem

    def _connect_through_tunnel(self, pid: int, config: WorkerConfig) -> socket.socket:
        ssh = str(config.userdata.get("ssh", "ssh"))
        destination = str(config.userdata.get("destination", config.host))
        # The forward's far end is the worker as its own machine reaches it (ssh there
        # resolves the target, and knows nothing of our aliases).
        listen = str(config.userdata.get("listen") or "0.0.0.0")
        target = f"{bracket('127.0.0.1' if listen == '0.0.0.0' else listen)}:{int(config.port)}"
        flags = list(config.sshflags or ())
        timeout = _worker_timeout()
        multiplexed = "ControlMaster=no" in flags
        last = ""
        for _ in range(5):  # a free local port can be taken before ssh binds it
            local_port = _free_local_port()
            forward = f"{local_port}:{target}"
            if multiplexed:
                done = subprocess.run(
                    [ssh, *flags, "-O", "forward", "-L", forward, destination], check=False,
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                    start_new_session=True)
                if done.returncode != 0:
                    last = done.stderr.decode(errors="replace").strip()
                    continue
                proc = None
            else:
                # The remote `sleep` bounds the forward's life when nobody uses it; ssh
                # stays while the master's connection through it is open.
                proc = subprocess.Popen(
                    [ssh, "-T", "-a", "-x", *flags, "-o", "ExitOnForwardFailure=yes",
                     "-L", forward, destination, f"sleep {max(1, int(timeout))}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, start_new_session=True)
            sock = _connect_when_listening(local_port, proc, timeout)
            if sock is not None:
                config.forward = forward
                with self._lock:
                    self._tunnels[pid] = (proc, forward)
                return sock
            if proc is not None:
                last = read_tail(proc.stderr) or f"ssh exited with code {proc.returncode}"
                _stop(proc)
            else:
                self._cancel_forward(config, forward)
        # (the caller's error names the worker and its host)
        raise ClusterError(f"cannot open an ssh tunnel: {last}")

    def _cancel_forward(self, config: WorkerConfig, forward: str) -> None:
        ssh = str(config.userdata.get("ssh", "ssh"))
        destination = str(config.userdata.get("destination", config.host))
        subprocess.run([ssh, *(config.sshflags or ()), "-O", "cancel", "-L", forward,
                        destination], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=10, start_new_session=True, check=False)

    # -- events and removal ------------------------------------------------------------

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """`register`: from now on, a worker whose ssh session ends leaves the cluster;
        `deregister`: close its tunnel. `interrupt` needs nothing here: the INTERRUPT
        message already reached the worker (Julia sends SIGINT over ssh instead)."""
        if op == "register":
            with self._lock:
                self._pids[id(config)] = pid
                stderr = self._stderr.get(id(config))
            if stderr is not None:
                stderr.joined(pid)
            session = config.userdata.get("session")
            if session is not None:
                session.joined(config.userdata["task"], pid)
        elif op == "deregister":
            with self._lock:
                tunnel = self._tunnels.pop(pid, None)
            if tunnel is not None:
                proc, forward = tunnel
                if proc is not None:
                    _stop(proc)
                else:
                    self._cancel_forward(config, forward)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit (EXIT message), then end its ssh session if it lingers
        (a session shared by several workers ends when they have all gone)."""
        with self._lock:
            self._exiting.add(pid)
        super().kill(pid, config)
        proc = config.process
        if proc is not None and config.userdata.get("session") is None:
            threading.Thread(target=escalate_exit, args=(proc,), daemon=True,
                             name=f"fastdist-ssh-reap-{pid}").start()

    def _watch_session(self, configs: list[WorkerConfig],
                       proc: subprocess.Popen[bytes]) -> None:
        """Wait for one ssh session to end. The workers whose session ends leave the
        cluster (and so exit: a worker never outlives its connection to the master);
        the session's hold on the host's shared connection is released."""
        code = proc.wait()
        path = _control_path(configs[0])
        if path is not None:
            self._hold_master(path, -1)
        for config in configs:
            with self._lock:
                pid = self._pids.pop(id(config), None)
                self._stderr.pop(id(config), None)
                asked = pid in self._exiting
                self._exiting.discard(pid)
            n = _node.peek()
            if pid is None or n is None:
                continue
            p = n.peers.get(pid)
            if p is None or p.config is not config or p.conn is None or p.conn.is_closed:
                continue
            if not asked:
                print(f"fastdist: worker {pid}'s ssh session to {config.host} ended "
                      f"(exit code {code}); removing it", file=sys.stderr, flush=True)
            p.conn.close(ProcessExitedException(pid))

    def _hold_master(self, path: str, delta: int) -> None:
        """Count the sessions using a shared connection; close it when none is left."""
        closing = []
        with self._lock:
            for key, master in list(self._masters.items()):
                if master.path != path:
                    continue
                master.users += delta
                if master.users <= 0:
                    del self._masters[key]
                    closing.append(master)
            if closing and not self._masters and self._control_dir is not None:
                control_dir, self._control_dir = self._control_dir, None
            else:
                control_dir = None
        for master in closing:
            master.close()
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the shared connections and tunnels this manager opened (workers end with them)."""
        with self._lock:
            masters, self._masters = list(self._masters.values()), {}
            tunnels, self._tunnels = list(self._tunnels.values()), {}
            control_dir, self._control_dir = self._control_dir, None
        for proc, _ in tunnels:
            if proc is not None:
                _stop(proc)
        for master in masters:
            master.close()
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)


def _is_count(value: Any) -> bool:
    if value == "auto":
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _control_path(config: WorkerConfig) -> str | None:
    return _control_path_in(config.sshflags or ())


def _control_path_in(flags: Any) -> str | None:
    for flag in flags:
        if isinstance(flag, str) and flag.startswith("ControlPath="):
            return flag[len("ControlPath="):]
    return None


def _fastdist_source_dir() -> str | None:
    # (this file is fastdist/managers/ssh.py: the package's parent is two folders up)
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.basename(parent) in ("site-packages", "dist-packages"):
        return None
    return parent


def _login_flags(machine: Machine, params: dict[str, Any]) -> list[str]:
    # ssh takes the first value given for an option: the spec's port beats a port in
    # sshflags (or in the ssh configuration).
    flags = ["-p", str(machine.port)] if machine.port is not None else []
    return flags + _flags(params.get("sshflags"))


def _listen_on(machine: Machine) -> tuple[str, int | None]:
    """The address (and port) the worker listens on."""
    if machine.bind_addr is not None:
        return machine.bind_addr, machine.bind_port
    if is_ip(machine.host):
        return machine.host, None
    if machine.host == "localhost":
        return "127.0.0.1", None
    # A name may resolve to a loopback alias on its own machine (Debian's 127.0.1.1), and
    # an alias's HostName to an address its machine does not own (NAT, a port forward):
    # listening everywhere avoids both.
    return "0.0.0.0", None


def _start_session(argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start an ssh session: the process, and the read end of its stderr.

    Its stderr is a pipe of our own, not `proc.stderr`, which the framework would
    relay as the worker's from the start: the manager reads it (a launch error
    quotes it). A new session: Ctrl-C at the master's terminal interrupts calls
    through messages, it does not kill the ssh sessions (Julia's `detach`)."""
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err_w, start_new_session=True)
    except BaseException:
        os.close(err_r)
        raise
    finally:
        os.close(err_w)
    return proc, err_r


def _describe_ssh_failure(where: str, code: int | None, stderr: str) -> str:
    if code == 255:
        what = "ssh could not log in or connect"
    elif code == 127:
        what = "the remote shell could not find the Python interpreter (exename)"
    else:
        what = "the worker exited before reporting its address"
    return f"cannot start a worker on {where}: {what} (exit code {code}): {stderr or 'no output'}"


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect_when_listening(port: int, proc: subprocess.Popen[bytes] | None,
                            timeout: float) -> socket.socket | None:
    """Connect to 127.0.0.1:port once ssh listens there; None if ssh gave up first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            time.sleep(0.02)
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        try:
            proc.stderr.close()
        except OSError:
            pass
