"""The `fastdist` command: `-p N|auto`, `--machine-file`, `--version`, `--help`; the script
runs as __main__ with its own argv once the workers are up, and they are gone at exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support import os_alive as alive

from fastdist.__main__ import UsageError, parse_args, read_machine_file

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
import json, os, sys
import fastdist as fd
from neighbour import twice  # a module beside the script: importable on the workers too

def ospid_of(_):
    return os.getpid()

pids = fd.workers()
print(json.dumps({
    "name": __name__,
    "argv": sys.argv,
    "workers": pids,
    "nprocs": fd.nprocs(),
    "doubled": [fd.remotecall_fetch(twice, p, p) for p in pids if p != 1],
    "ospids": [fd.remotecall_fetch(ospid_of, p, 0) for p in pids if p != 1],
}), flush=True)
code = os.environ.get("SCRIPT_EXIT")
if code == "raise":
    raise RuntimeError("the script failed")
if code:
    sys.exit(int(code))
"""


def gone(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(SCRIPT)
    (tmp_path / "neighbour.py").write_text("def twice(x):\n    return 2 * x\n")
    return path


def run(args, *, entry="module", env_extra=None, cwd=None, timeout=90):
    """Run the CLI as `python -m fastdist` or through the console-script entry point."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               **(env_extra or {}))
    if entry == "module":
        argv = [sys.executable, "-m", "fastdist", *args]
    else:  # exactly what the `fastdist` console script runs
        argv = [sys.executable, "-c",
                "import sys; from fastdist.__main__ import main; sys.exit(main())", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def report(done) -> dict:
    line = next((line for line in done.stdout.splitlines() if line.startswith("{")), None)
    assert line is not None, f"no report; stdout={done.stdout!r} stderr={done.stderr!r}"
    return json.loads(line)


@pytest.mark.parametrize("entry", ["module", "console-script"])
def test_p_starts_workers_before_the_script(script, entry):
    done = run(["-p", "2", str(script), "one", "--two"], entry=entry)
    assert done.returncode == 0, done.stderr
    facts = report(done)
    assert facts["name"] == "__main__"
    assert facts["argv"] == [str(script), "one", "--two"]
    assert facts["workers"] == [2, 3] and facts["nprocs"] == 3
    assert facts["doubled"] == [4, 6]
    assert gone(facts["ospids"]), "workers outlived the command"


def test_p_auto_is_one_worker_per_cpu(script):
    done = run(["-p", "auto", str(script)])
    assert done.returncode == 0, done.stderr
    assert len(report(done)["workers"]) == os.cpu_count()


def test_no_workers_runs_on_the_master_alone(script):
    facts = report(run([str(script)]))
    assert facts["workers"] == [1] and facts["nprocs"] == 1


@pytest.mark.parametrize("how, code", [("3", 3), ("0", 0), ("raise", 1)])
def test_exit_status_and_cleanup_whatever_the_script_does(script, how, code):
    done = run(["-p", "2", str(script)], env_extra={"SCRIPT_EXIT": how})
    assert done.returncode == code, done.stderr
    if how == "raise":
        assert "RuntimeError: the script failed" in done.stderr
        assert "fastdist/__main__.py" not in done.stderr  # the traceback is the script's
    assert gone(report(done)["ospids"])


def test_version_help_and_usage_errors():
    from fastdist import __version__

    done = run(["--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"fastdist {__version__}"
    done = run(["--help"])
    assert done.returncode == 0 and "--machine-file" in done.stdout and "-p" in done.stdout
    for bad in (["-p", "many", "x.py"], ["--bogus"], ["-p"], ["missing-script.py"]):
        done = run(bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "fastdist:" in done.stderr


def test_c_command_and_stdin_program():
    done = run(["-p", "1", "-c", "import fastdist as fd, sys; print(fd.workers(), sys.argv)", "x"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2] ['-c', 'x']"


def test_parse_args_stops_at_the_script():
    opts = parse_args(["-p", "3", "job.py", "-p", "9", "--machine-file", "f"])
    assert opts["procs"] == 3 and opts["script"] == "job.py"
    assert opts["args"] == ["-p", "9", "--machine-file", "f"]
    assert parse_args(["-p4", "--machine-file=hosts", "j.py"])["machine_file"] == "hosts"
    assert parse_args(["--procs=auto", "j.py"])["procs"] == os.cpu_count()
    with pytest.raises(UsageError):
        parse_args(["-p", "-1", "j.py"])


def test_read_machine_file(tmp_path):
    f = tmp_path / "machines"
    f.write_text("# the cluster\n\nnode1\n  4*alice@node2:2222  # four there\n"
                 "bob@[::1]:22 10.0.0.1\n2 * node3\n")
    assert read_machine_file(str(f)) == [("node1", 1), ("alice@node2:2222", 4),
                                         ("bob@[::1]:22 10.0.0.1", 1), ("node3", 2)]
    f.write_text("x*node1\n")
    with pytest.raises(UsageError, match="line 1"):
        read_machine_file(str(f))


def test_machine_file_starts_ssh_workers(script, tmp_path, sshd_server):
    flags, skip = [], False
    for flag in sshd_server.sshflags:  # the port goes in the machine file
        if skip:
            skip = False
        elif flag == "-p":
            skip = True
        else:
            flags.append(flag)
    machines = tmp_path / "machines"
    spec = f"{sshd_server.user}@{sshd_server.host}:{sshd_server.port}"
    machines.write_text(f"# two workers over ssh\n\n2*{spec}\n")
    # ssh workers start in the master's directory (Julia's default `dir`), so from the
    # script's directory they import its neighbours as local workers do
    done = run(["-p", "1", "--machine-file", str(machines), "--sshflags", " ".join(flags),
                str(script), "arg"], cwd=script.parent)
    assert done.returncode == 0, done.stderr
    facts = report(done)
    assert facts["workers"] == [2, 3, 4]
    assert facts["doubled"] == [4, 6, 8]
    assert facts["argv"] == [str(script), "arg"]
    assert gone(facts["ospids"]), "ssh workers outlived the command"


def test_interactive_console_has_fd_and_says_the_workers_are_up():
    import pty
    import select

    leader, follower = pty.openpty()  # a terminal on stdin: the console, as a user gets it
    proc = subprocess.Popen([sys.executable, "-m", "fastdist", "-p", "2"], stdin=follower,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    said = b""

    def read_until(needle: bytes, timeout: float = 60, after: int = 0) -> None:
        nonlocal said
        deadline = time.monotonic() + timeout
        while needle not in said[after:]:
            assert time.monotonic() < deadline, said.decode(errors="replace")
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    said += os.read(leader, 4096)
                except OSError:  # the console ended
                    break

    try:
        read_until(b">>> ")
        banner = said.decode()
        assert "2 workers up (pids 2, 3)" in banner and "imported as fd" in banner, banner
        os.write(leader, b"print('workers', fd.workers(), fd.pmap(abs, [-1, -2]))\n")
        read_until(b"workers [2, 3] [1, 2]")
        # The next prompt: typed before it, ^D would reach the terminal while it is
        # not yet in readline's mode, and be lost (a person waits for the prompt too).
        read_until(b">>> ", after=said.index(b"workers [2, 3] [1, 2]"))
        os.write(leader, b"\x04")  # end of input: the console ends, the workers go
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def test_a_script_finds_fd_defined(tmp_path):
    script = tmp_path / "uses_fd.py"
    script.write_text("print('workers', fd.workers())\n")
    result = subprocess.run([sys.executable, "-m", "fastdist", "-p", "1", str(script)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "workers [2]"
