"""SlurmManager: workers as the tasks of one `srun` job step, in or as a Slurm allocation.

After ClusterManagers.jl's `SlurmManager`, without its output files: one
`srun --label` runs `np` workers, the cookie goes to every task on srun's
stdin (srun forwards its stdin to all tasks), and srun's labelled stdout is
split back into one stream per task, on which each worker's
`fastdist_worker:PORT#HOST` line and later output arrive. Task stderr is
relayed as the worker's; srun's own messages go to the master's stderr and
into the error when a launch fails.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

from fastdist.exceptions import ClusterError
from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.managers.labelled import LabelledOutput, wait_reported
from fastdist.managers.process import (
    escalate_exit,
    send_cookie,
    worker_command,
    worker_environment,
)
from fastdist.node import worker_timeout


def srun_flags(options: dict[str, Any]) -> list[str]:
    """Turn keyword options into srun flags.

    `partition="debug"` -> `--partition=debug`, `cpus_per_task=2` ->
    `--cpus-per-task=2`, `overcommit=True` -> `--overcommit`, `N=1` -> `-N 1`,
    `O=True` -> `-O`; `False` and `None` leave a flag out.

    Example:
        >>> srun_flags({"partition": "debug", "overcommit": True, "N": 1})
        ['--partition=debug', '--overcommit', '-N', '1']
    """
    flags: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        if len(key) == 1:
            flags.append(f"-{key}")
            if value is not True:
                flags.append(str(value))
        else:
            name = "--" + key.replace("_", "-")
            flags.append(name if value is True else f"{name}={value}")
    return flags


class SlurmManager(ClusterManager):
    """Launch `np` workers with one `srun`, inside the current allocation or as a new one.

    Inside an allocation (`SLURM_JOB_ID` set, e.g. under `salloc` or `sbatch`)
    the workers are a job step of it; elsewhere srun asks for an allocation of
    its own first. `addprocs` keywords `exename`, `exeflags`, `dir` (srun's
    `--chdir`), `env` and `enable_threaded_blas` apply; tasks get the master's
    environment and `sys.path`, as local workers do (srun exports the
    environment to the tasks).

    Args:
        np: how many workers (srun tasks).
        srun_options: srun flags as keywords: `partition="debug"` ->
            `--partition=debug`, `time="00:10:00"`, `overcommit=True` ->
            `--overcommit` (needed for more tasks than CPUs), `N=2` -> `-N 2`.

    Raises:
        ValueError: `np` is negative.

    Example:
        >>> fd.addprocs(fd.SlurmManager(4, partition="debug", time="00:30:00"))
        [2, 3, 4, 5]
    """

    keywords = frozenset()
    keywords_hint = "srun's options go to SlurmManager(np, partition=..., time=...)"

    def __init__(self, np: int, **srun_options: Any) -> None:
        if int(np) < 0:
            raise ValueError("the number of workers must be non-negative")
        self.np = int(np)
        self.srun_options = srun_options
        self.srun: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._output: LabelledOutput | None = None
        self._live = 0

    def __repr__(self) -> str:
        return f"SlurmManager(np={self.np}, {self.srun_options!r})"

    def srun_command(self, params: dict[str, Any]) -> list[str]:
        """The srun command line that launch runs."""
        options = dict(self.srun_options)
        if not any(k in options for k in ("job_name", "J")):
            options["job_name"] = "fastdist"
        if params.get("dir") is not None and not any(k in options for k in ("chdir", "D")):
            options["chdir"] = params["dir"]
        # One worker leaving (rmprocs, a crash) must not end the others' step.
        options.setdefault("kill_on_bad_exit", 0)
        worker = worker_command(params.get("exename") or sys.executable, params.get("exeflags"),
                                "0.0.0.0", separate_stderr=True)
        return ["srun", f"--ntasks={self.np}", "--label", *srun_flags(options), *worker]

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Run srun, hand the framework one stream per task, wait until each task reported.

        Raises:
            ClusterError: srun is missing, exited, or its tasks did not report within
                FASTDIST_WORKER_TIMEOUT; the message quotes what srun said.
        """
        if self.np == 0:
            return
        environ = worker_environment(params.get("env"),
                                     bool(params.get("enable_threaded_blas", False)))
        argv = self.srun_command(params)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=environ,
                                    start_new_session=True)
        except FileNotFoundError:
            raise ClusterError("cannot launch Slurm workers: srun is not on PATH") from None
        self.srun = proc
        send_cookie(proc, params["cookie"])  # srun hands its stdin to every task
        assert proc.stdout is not None and proc.stderr is not None
        output = self._output = LabelledOutput(proc.stdout, proc.stderr, self.np,
                                               "fastdist-srun", on_stderr_end=proc.wait)
        configs = [WorkerConfig(io=output.streams[task], count=1,
                                exename=params.get("exename"),
                                exeflags=params.get("exeflags"), environ=params.get("env"),
                                enable_threaded_blas=params.get("enable_threaded_blas"),
                                userdata={"task": task, "srun": proc})
                   for task in range(self.np)]
        with launch_ntfy:
            launched.extend(configs)
            self._live = len(configs)
            launch_ntfy.notify_all()
        reported = wait_reported(configs, proc)
        if reported == self.np:
            return
        if proc.poll() is None:
            why = (f"{self.np - reported} of {self.np} srun tasks did not report within "
                   f"{worker_timeout():g} s (FASTDIST_WORKER_TIMEOUT)")
            # Ending srun ends the tasks and gives every unread stream its EOF at once.
            threading.Thread(target=escalate_exit, args=(proc, 0.0), daemon=True).start()
        else:
            why = (f"srun exited with code {proc.returncode} before {self.np - reported} of "
                   f"{self.np} workers reported")
        raise ClusterError(f"cannot launch Slurm workers ({' '.join(argv[:argv.index('--label')])}"
                           f" ...): {why}{output.said()}")

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """`register`: relay its task's stderr under its pid; `deregister`: when the
        last worker is gone, make sure srun (the job step) ends too."""
        task = config.userdata.get("task") if isinstance(config.userdata, dict) else None
        if op == "register" and task is not None and self._output is not None:
            self._output.joined(task, pid)
        elif op == "deregister":
            with self._lock:
                self._live -= 1
                last = self._live <= 0
            if last and self.srun is not None:
                threading.Thread(target=escalate_exit, args=(self.srun,), daemon=True,
                                 name="fastdist-srun-reap").start()

