"""A single-node Slurm cluster (slurmctld + slurmd + munged) for integration tests.

    with SlurmCluster() as cl:
        subprocess.run(["srun", "-p", cl.partition, "-n", "2", "hostname"], env=cl.env)

The node is this machine (``hostname -s``, reached at 127.0.0.1) with CPUs=2; the
partition ``debug`` is the default one and lets up to 4 jobs share each CPU
(OverSubscribe=FORCE:4).  State, spool, pid and log files live in a private
scratch directory.  The configuration is written to /etc/slurm/slurm.conf (so
plain ``srun``/``sbatch`` find it); a configuration that was there before is
backed up and put back on stop.  ``.env`` also names the file via SLURM_CONF.

Passing data to tasks on stdin (checked with slurm-wlm 22.05): ``srun`` forwards
its own stdin to *every* task by default (``--input=all``), so
``echo COOKIE | srun -n 2 sh -c 'head -1'`` prints COOKIE twice; ``--input=0``
sends it to task 0 only (the others see EOF).  Lines arrive while srun's stdin is
still open; closing it gives the tasks EOF.  See test_services.py for the checks.

One job step with more tasks than the node has CPUs (``srun -n 3`` here) waits
for resources forever unless srun gets ``--overcommit`` (``-O``); the
oversubscription in the partition lets *separate* jobs share CPUs.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from ._util import (
    ensure_installed,
    kill_pids,
    kill_tree,
    pid_alive,
    read_pidfile,
    require_root,
    run,
    tail,
)

SLURM_CONF = Path("/etc/slurm/slurm.conf")
BACKUP = SLURM_CONF.with_name("slurm.conf.fastdist-backup")
MARKER = "# fastdist test cluster"
DIR_PREFIX = "fastdist-slurm-"

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_DIRS = ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge")
MUNGED_PIDFILE = Path("/run/munge/munged.pid")
# names the test run that started munged, so a later run can stop a crashed run's one
MUNGED_OWNER = Path("/run/munge/fastdist-test-owner")
# set in the daemons' environment; slurmstepd (and so every job step) inherits it
OWNER_ENV = "FASTDIST_TEST_SLURM_OWNER"


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], check=False, capture_output=True, timeout=5)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(
            ["unmunge"], check=False, input=enc.stdout, capture_output=True, timeout=5
        )
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _environ_owner(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    m = re.search(rb"(?:^|\0)" + OWNER_ENV.encode() + rb"=(\d+)", env)
    return int(m.group(1)) if m else None


def _cluster_pids(owner: int) -> list[int]:
    """Daemons and job steps started for the test run ``owner``."""
    return [p for p in _all_pids() if _environ_owner(p) == owner]


def cleanup_stale() -> None:
    """Stop daemons and jobs and undo config changes left by a run that crashed."""
    owners = {o for p in _all_pids() if (o := _environ_owner(p)) is not None}
    for owner in owners:
        if owner != os.getpid() and not pid_alive(owner):
            for pid in _cluster_pids(owner):
                kill_tree(pid, grace=1.0)
    for d in glob.glob(os.path.join(tempfile.gettempdir(), DIR_PREFIX + "*")):
        m = re.match(re.escape(DIR_PREFIX) + r"(\d+)-", os.path.basename(d))
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    _restore_conf(only_if_stale=True)


def _conf_owner() -> int | None:
    try:
        first = SLURM_CONF.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.match(re.escape(MARKER) + r" owner=(\d+)", first)
    return int(m.group(1)) if m else None


def _restore_conf(only_if_stale: bool = False) -> None:
    owner = _conf_owner()
    if owner is None:
        return  # not ours: leave it alone
    if only_if_stale and pid_alive(owner):
        return
    if BACKUP.exists():
        os.replace(BACKUP, SLURM_CONF)
    else:
        SLURM_CONF.unlink(missing_ok=True)


class SlurmCluster:
    """slurmctld + slurmd on this machine, partition ``debug``."""

    partition = "debug"

    def __init__(self, cpus: int = 2, oversubscribe: int = 4, start_timeout: float = 30.0):
        self.cpus = cpus
        self.oversubscribe = oversubscribe
        self.start_timeout = start_timeout
        self.node = short_hostname()
        self.user = getpass.getuser()
        self.dir: Path | None = None
        self.conf_path = SLURM_CONF
        self.env = {"SLURM_CONF": str(SLURM_CONF)}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started_munged = False
        self._wrote_conf = False
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        require_root("SlurmCluster")
        ensure_installed("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "srun")
        cleanup_stale()
        owner = _conf_owner()
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            raise RuntimeError(f"another live test run (pid {owner}) owns {SLURM_CONF}")
        self._running = True
        try:
            self._start_munge()
            self._setup_dir()
            self._write_conf()
            self._start_daemons()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        env = {**os.environ, **self.env}
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            subprocess.run(
                ["scancel", "-u", self.user], check=False, env=env, capture_output=True, timeout=15
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                q = subprocess.run(
                    ["squeue", "-h", "-o", "%i"],
                    check=False, env=env, capture_output=True, text=True, timeout=15,
                )  # fmt: skip
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            pid = read_pidfile(self.dir / f"{name}.pid") if self.dir else None
            if proc is not None:
                kill_tree(proc.pid)
                proc.wait(timeout=10)
            if pid and pid_alive(pid):
                kill_tree(pid)
        # job steps (slurmstepd and what runs below it) left behind by slurmd
        for pid in _cluster_pids(os.getpid()):
            kill_tree(pid, grace=1.0)
        if self._started_munged:
            self._started_munged = False
            pid = read_pidfile(MUNGED_PIDFILE)
            if pid and pid_alive(pid):
                kill_pids([pid])
            MUNGED_OWNER.unlink(missing_ok=True)
        if self._wrote_conf:
            self._wrote_conf = False
            _restore_conf()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SlurmCluster node={self.node} partition={self.partition}>"

    # -- helpers for tests ---------------------------------------------------------------

    def run(self, argv, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command with this cluster's environment."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("check", False)
        kwargs["env"] = {**os.environ, **self.env, **kwargs.get("env", {})}
        return subprocess.run(list(argv), **kwargs)

    def logs(self) -> str:
        if self.dir is None:
            return ""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            p = self.dir / name
            if p.exists():
                parts.append(f"--- {name} ---\n{tail(p, 4000)}")
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------------------

    def _start_munge(self) -> None:
        if munge_works():
            # reuse it; if a crashed test run had started it, it is ours to stop now
            owner = read_pidfile(MUNGED_OWNER)
            if owner is not None and not pid_alive(owner):
                MUNGED_OWNER.write_text(f"{os.getpid()}\n")
                self._started_munged = True
            return
        pid = read_pidfile(MUNGED_PIDFILE)
        if pid and pid_alive(pid):
            kill_pids([pid])  # running but broken (e.g. a key that changed under it)
        key = os.urandom(1024)
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.unlink(missing_ok=True)
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with open(fd, "wb") as f:
            f.write(key)
        for d in MUNGE_DIRS:
            os.makedirs(d, exist_ok=True)
        run(["chown", "-R", "munge:munge", *MUNGE_DIRS])
        os.chmod(MUNGE_KEY, 0o400)
        os.chmod("/etc/munge", 0o700)
        os.chmod("/run/munge", 0o755)
        run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], timeout=15)
        self._started_munged = True
        MUNGED_OWNER.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 5
        while not munge_works():
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but munge -n | unmunge fails:\n"
                                   + tail("/var/log/munge/munged.log"))  # fmt: skip
            time.sleep(0.05)

    def _setup_dir(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        os.chmod(self.dir, 0o755)
        (self.dir / "state").mkdir()
        (self.dir / "spool").mkdir()

    def _conf_text(self) -> str:
        d, node = self.dir, self.node
        return f"""\
{MARKER} owner={os.getpid()} -- restored on stop, backup in {BACKUP.name}
ClusterName=fastdist
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=2
MinJobAge=10
SlurmdTimeout=300
SlurmctldTimeout=120
NodeName={node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName={self.partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:{self.oversubscribe}
"""

    def _write_conf(self) -> None:
        assert self.dir is not None
        text = self._conf_text()
        (self.dir / "slurm.conf").write_text(text)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SLURM_CONF.exists() and _conf_owner() is None:
            shutil.copy2(SLURM_CONF, BACKUP)
        tmp = SLURM_CONF.with_name(f".slurm.conf.{os.getpid()}")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, SLURM_CONF)
        self._wrote_conf = True

    def _start_daemons(self) -> None:
        assert self.dir is not None
        conf = str(self.dir / "slurm.conf")  # same text; names this run in `ps`
        for name in ("slurmctld", "slurmd"):
            with open(self.dir / f"{name}.out", "wb") as out:
                self._procs[name] = subprocess.Popen(
                    [f"/usr/sbin/{name}", "-D", "-f", conf],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, **self.env, OWNER_ENV: str(os.getpid())},
                )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while True:
            self._check_alive()
            p = self.run(["sinfo", "-h", "-p", self.partition, "-o", "%t"], timeout=10)
            state = p.stdout.strip() or p.stderr.strip()
            if p.returncode == 0 and state == "idle":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurm node not idle after {self.start_timeout}s "
                                   f"(sinfo: {state!r}):\n{self.logs()}")  # fmt: skip
            time.sleep(0.1)
        remaining = max(5.0, deadline - time.monotonic())
        try:
            p = self.run(["srun", "-n", "2", "hostname"], timeout=remaining,
                         stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"srun -n 2 hostname hung:\n{self.logs()}") from None
        if p.returncode != 0 or p.stdout.split() != [self.node, self.node]:
            raise RuntimeError(
                f"srun -n 2 hostname failed ({p.returncode}): {p.stdout!r} {p.stderr!r}\n"
                + self.logs()
            )
