"""A private OpenSSH server for integration tests (key login for the current user).

    with SSHServer() as srv:                       # 127.0.0.1, free port
        subprocess.run(srv.ssh_command("echo", "hi"))
        # or, for a cluster manager: ssh flags + user@host
        addprocs([srv.user + "@" + srv.host], sshflags=srv.sshflags)

Each server has its own temporary directory holding a host key, a user key, the
sshd_config, the pid file and the log.  The user's public key is appended to
``~/.ssh/authorized_keys`` (tagged with a comment naming this process) and removed
again on stop.  ``SSHServer(host=addr, netns=name)`` runs sshd inside a network
namespace (see netns.py).

Sessions started through this server get ``PATH`` with the directory of the
running Python interpreter first, so ``python3`` on the "remote" side is the same
interpreter (with fastdist importable) as the one running the tests.
"""

from __future__ import annotations

import fcntl
import getpass
import glob
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

from ._util import ensure_installed, kill_tree, pid_alive, read_pidfile, require_root, run, tail

SSHD = "/usr/sbin/sshd"
DIR_PREFIX = "fastdist-sshd-"
KEY_TAG = "fastdist-test-sshd-"


def _default_session_path() -> str:
    pydir = os.path.dirname(sys.executable)
    base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return f"{pydir}:{base}"


def _ssh_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".ssh"


class _AuthorizedKeys:
    """Append/remove single lines of ~/.ssh/authorized_keys under a lock."""

    def __init__(self) -> None:
        self.dir = _ssh_dir()
        self.path = self.dir / "authorized_keys"

    def _lock(self):
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(self.dir / ".fastdist-authorized_keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def _write(self, lines: list[str]) -> None:
        tmp = self.path.with_name(f".authorized_keys.{os.getpid()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, line: str) -> None:
        fd = self._lock()
        try:
            lines = self._read()
            if line not in lines:
                lines.append(line)
            self._write(lines)
        finally:
            os.close(fd)

    def remove(self, predicate) -> None:
        fd = self._lock()
        try:
            if not self.path.exists():
                return
            lines = self._read()
            kept = [line for line in lines if not predicate(line)]
            if kept != lines:
                self._write(kept)
        finally:
            os.close(fd)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tcp_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def cleanup_stale() -> None:
    """Remove servers, directories and authorized_keys lines of dead test runs."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), DIR_PREFIX + "*")):
        m = re.match(re.escape(DIR_PREFIX) + r"(\d+)-", os.path.basename(d))
        if not m or pid_alive(int(m.group(1))):
            continue
        pid = read_pidfile(os.path.join(d, "sshd.pid"))
        if pid and pid_alive(pid):
            from ._util import cmdline

            if any(d in a for a in cmdline(pid)):
                kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)

    def stale(line: str) -> bool:
        m = re.search(re.escape(KEY_TAG) + r"(\d+)-", line)
        return bool(m) and not pid_alive(int(m.group(1)))

    if (_ssh_dir() / "authorized_keys").exists():
        _AuthorizedKeys().remove(stale)


class SSHServer:
    """An sshd bound to one address, accepting key logins for the current user."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        netns: str | None = None,
        session_env: dict[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.host = host
        self._want_port = port
        self.port: int | None = port
        self.netns = netns
        self.user = getpass.getuser()
        self.start_timeout = start_timeout
        env = {"PATH": _default_session_path()}
        env.update(session_env or {})
        self.session_env = env
        self.dir: Path | None = None
        self.key_path: str | None = None
        self._pubkey_line: str | None = None
        self._proc: subprocess.Popen | None = None
        self._tag = f"{KEY_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # -- public API -----------------------------------------------------------------

    @property
    def sshflags(self) -> tuple[str, ...]:
        return (
            "-i", str(self.key_path),
            "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
        )  # fmt: skip

    @property
    def address(self) -> str:
        """``user@host`` as ssh takes it."""
        return f"{self.user}@{self.host}"

    def ssh_command(self, *remote_args: str) -> list[str]:
        return ["ssh", *self.sshflags, self.address, *remote_args]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "sshd.log"

    def start(self) -> SSHServer:
        if self.netns:
            require_root("SSHServer in a network namespace")
        ensure_installed(SSHD, "ssh", "ssh-keygen")
        cleanup_stale()
        try:
            self._setup_dir()
            self._start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        pid = None
        if self.dir is not None:
            pid = read_pidfile(self.dir / "sshd.pid")
        if proc is not None:
            kill_tree(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if pid and pid_alive(pid):
            kill_tree(pid)
        if self._pubkey_line is not None:
            line, self._pubkey_line = self._pubkey_line, None
            _AuthorizedKeys().remove(lambda existing: existing == line)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        ns = f" netns={self.netns}" if self.netns else ""
        return f"<SSHServer {self.address}:{self.port}{ns}>"

    # -- internals ------------------------------------------------------------------

    def _setup_dir(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        os.chmod(self.dir, 0o700)
        hostkey = self.dir / "host_ed25519"
        userkey = self.dir / "user_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fastdist-test-host",
             "-f", str(hostkey)])  # fmt: skip
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self._tag,
             "-f", str(userkey)])  # fmt: skip
        self.key_path = str(userkey)
        line = (self.dir / "user_ed25519.pub").read_text().strip()
        _AuthorizedKeys().add(line)
        self._pubkey_line = line
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def _write_config(self) -> Path:
        assert self.dir is not None
        setenv = " ".join(f'"{k}={v}"' for k, v in self.session_env.items())
        cfg = self.dir / "sshd_config"
        cfg.write_text(
            f"""\
Port {self.port}
ListenAddress {self.host}
HostKey {self.dir / "host_ed25519"}
PidFile {self.dir / "sshd.pid"}
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
AllowTcpForwarding yes
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 100:30:200
MaxSessions 100
LogLevel INFO
SetEnv {setenv}
"""
        )
        return cfg

    def _candidate_ports(self):
        if self._want_port is not None:
            yield self._want_port
            return
        if self.netns:
            # a fresh namespace has nothing listening; prefer the standard port
            yield 22
            for _ in range(4):
                yield random.randint(20000, 60000)
        else:
            for _ in range(5):
                try:
                    yield _free_port(self.host)
                except OSError as e:
                    raise RuntimeError(f"sshd cannot listen on {self.host}: {e}") from None

    def _start_daemon(self) -> None:
        assert self.dir is not None
        errors = []
        for port in self._candidate_ports():
            self.port = port
            cfg = self._write_config()
            for name in ("sshd.pid", "sshd.log"):
                (self.dir / name).unlink(missing_ok=True)
            argv = [SSHD, "-D", "-f", str(cfg), "-E", str(self.log_path)]
            if self.netns:
                argv = ["ip", "netns", "exec", self.netns, *argv]
            with open(self.dir / "sshd.stderr", "wb") as err:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            status = self._wait_ready()
            if status == "ok":
                return
            log = tail(self.dir / "sshd.stderr") + tail(self.log_path)
            errors.append(f"port {port}: {status}\n{log}")
            if self._proc is not None:
                kill_tree(self._proc.pid)
                self._proc.wait()
                self._proc = None
            if status != "exited" or "Address already in use" not in log:
                break
        raise RuntimeError(
            f"sshd on {self.host} (netns={self.netns}) did not start:\n" + "\n".join(errors)
        )

    def _wait_ready(self) -> str:
        assert self._proc is not None and self.dir is not None
        deadline = time.monotonic() + self.start_timeout
        pidfile = self.dir / "sshd.pid"
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return "exited"
            # sshd writes its pid file once it listens
            if read_pidfile(pidfile) != self._proc.pid or not _tcp_ready(self.host, self.port):
                time.sleep(0.02)
                continue
            argv = ["ssh", "-o", "ConnectTimeout=3", *self.sshflags, self.address, "true"]
            try:
                p = subprocess.run(
                    argv,
                    check=False,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, min(5.0, deadline - time.monotonic())),
                )
            except subprocess.TimeoutExpired:
                last = "ssh true timed out"
                continue
            if p.returncode == 0:
                return "ok"
            last = f"ssh true failed ({p.returncode}): {p.stderr.strip()}"
            time.sleep(0.1)
        return f"not ready after {self.start_timeout}s ({last or 'not listening'})"
