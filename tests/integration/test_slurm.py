"""SlurmManager against a real one-node Slurm: one srun, its tasks as workers, output,
launch failures, an existing allocation, and no job step left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support import collect_printed, eventually

import fastdist as fd
from fastdist.managers.slurm import SlurmManager, srun_flags

pytestmark = pytest.mark.timeout(180)


def squeue(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_srun_flags_follow_the_keywords():
    assert srun_flags({"partition": "debug", "time": "00:10:00", "overcommit": True,
                       "exclusive": False, "mem": None, "cpus_per_task": 1, "N": 1, "O": True}) == [
        "--partition=debug", "--time=00:10:00", "--overcommit", "--cpus-per-task=1",
        "-N", "1", "-O"]
    cmd = SlurmManager(3, partition="debug").srun_command(
        {"dir": "/tmp", "exeflags": ("-X", "dev")})
    assert cmd[:3] == ["srun", "--ntasks=3", "--label"]
    assert "--partition=debug" in cmd and "--chdir=/tmp" in cmd and "--job-name=fastdist" in cmd
    assert cmd[-7:] == ["-X", "dev", "-m", "fastdist.worker", "--bind-to", "0.0.0.0",
                        "--separate-stderr"]
    assert fd.SlurmManager is SlurmManager
    with pytest.raises(ValueError):
        SlurmManager(-1)


def test_slurm_workers_are_one_job_step(cluster, slurm_cluster):
    manager = SlurmManager(3, partition=slurm_cluster.partition, overcommit=True, time="00:10:00")
    pids = fd.addprocs(manager)
    cluster.pids.extend(pids)
    assert len(pids) == 3 and set(pids) <= set(fd.workers())
    facts = [fd.remotecall_fetch(lambda: (fd.myid(), os.environ.get("SLURM_PROCID"),
                                          os.environ.get("SLURM_JOB_ID"),
                                          os.environ.get("OMP_NUM_THREADS")), p) for p in pids]
    assert [f[0] for f in facts] == pids
    assert sorted(f[1] for f in facts) == ["0", "1", "2"]
    assert len({f[2] for f in facts}) == 1 and facts[0][2]
    assert {f[3] for f in facts} == {"1"}
    # worker to worker, and the job is listed under its name while the workers run
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, pids[2]), pids[0]) == pids[2]
    assert any(" fastdist " in line for line in squeue(slurm_cluster.env))
    # each task's output comes back under its own pid, stdout and stderr apart
    with collect_printed() as printed:
        for p in pids:
            fd.remotecall_fetch(lambda: print(f"out of {fd.myid()}", flush=True), p)
        fd.remotecall_fetch(lambda: print("err of task", file=sys.stderr, flush=True), pids[1])
        for p in pids:
            printed.wait_for(f"out of {p}")
        seen = printed.wait_for("err of task", "err")
    for p in pids:
        assert f"From worker {p}:\tout of {p}" in seen["out"]
    assert f"From worker {pids[1]}:\terr of task" in seen["err"]
    # removing one worker leaves the others (and the step) running
    fd.rmprocs(pids[0], waitfor=30)
    assert fd.remotecall_fetch(fd.myid, pids[1]) == pids[1]
    fd.rmprocs(pids[1:], waitfor=30)
    assert eventually(lambda: manager.srun.poll() is not None, 20), "srun outlived its workers"
    assert eventually(lambda: not squeue(slurm_cluster.env), 20), "the job outlived its workers"


def test_a_bad_srun_option_is_a_clear_error(cluster, slurm_cluster):
    before = fd.workers()
    with pytest.raises(fd.ClusterError, match="invalid partition"):
        fd.addprocs(SlurmManager(2, partition="no-such-partition"))
    assert fd.workers() == before


def test_a_step_that_never_starts_times_out_and_is_cancelled(cluster, slurm_cluster, monkeypatch):
    monkeypatch.setenv("FASTDIST_WORKER_TIMEOUT", "4")
    manager = SlurmManager(1, partition=slurm_cluster.partition, begin="now+1hour")
    t0 = time.monotonic()
    with pytest.raises(fd.ClusterError, match="did not report"):
        fd.addprocs(manager)
    assert time.monotonic() - t0 < 30
    assert fd.workers() == [1]
    assert eventually(lambda: manager.srun.poll() is not None, 20)
    assert eventually(lambda: not squeue(slurm_cluster.env), 20), "the pending job was left queued"


INSIDE_ALLOCATION = """
import json, os
import fastdist as fd
pids = fd.addprocs(fd.SlurmManager(2, overcommit=True))
jobs = [fd.remotecall_fetch(lambda: os.environ.get("SLURM_JOB_ID"), p) for p in pids]
print(json.dumps({"master": os.environ.get("SLURM_JOB_ID"), "workers": jobs}), flush=True)
fd.rmprocs(pids, waitfor=30)
"""


def test_inside_an_existing_allocation(slurm_cluster):
    env = {**os.environ, **slurm_cluster.env,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        ["salloc", "--partition", slurm_cluster.partition, "--ntasks=1", "--overcommit",
         sys.executable, "-c", INSIDE_ALLOCATION],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    facts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert facts["master"] and facts["workers"] == [facts["master"]] * 2
