"""A cluster manager with a transport of its own: each worker talks to the master over a
Unix socketpair handed to it at birth, wrapped as a pair of binary file objects.

The master side is a `ClusterManager` whose `connect` returns two streams that are
not sockets; the worker side is `init_worker(cookie, manager)` followed by
`process_messages(r, w, incoming=True)`. Remote calls, Futures, RemoteChannels and
pmap then run over those streams exactly as over TCP. The workers do not listen
on any port, so the cluster uses the `"master_worker"` topology: workers talk to
pid 1 only.

Run it:

    python examples/custom_transport.py        # starts 2 workers, runs a few calls
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from typing import Any

import fastdist as fd
from fastdist.managers.local import escalate_exit, worker_environment


class SocketPairManager(fd.ClusterManager):
    """Start `np` local workers, each reached through its own AF_UNIX socketpair.

    Args:
        np: how many workers to start.

    Example:
        >>> pids = fd.addprocs(SocketPairManager(2), topology="master_worker")
        >>> fd.remotecall_fetch(os.getpid, pids[0]) != os.getpid()
        True
    """

    def __init__(self, np: int) -> None:
        self.np = int(np)

    def launch(self, params: dict[str, Any], launched: list[fd.WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        environ = worker_environment(params.get("env"), bool(params.get("enable_threaded_blas")))
        exename = params.get("exename") or sys.executable
        for _ in range(self.np):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            proc = subprocess.Popen(
                [exename, os.path.abspath(__file__), "--worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE, env=environ,
                cwd=params.get("dir"))
            theirs.close()
            assert proc.stdin is not None
            # The cookie travels on stdin, never on the command line.
            proc.stdin.write((fd.cluster_cookie() + "\n").encode())
            proc.stdin.close()
            # No io and no port: this manager's connect knows how to reach the worker.
            config = fd.WorkerConfig(process=proc, ospid=proc.pid, userdata={"socket": ours})
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: fd.WorkerConfig) -> tuple[Any, Any]:
        """Two buffered file objects over the socketpair: not sockets, so fastdist serves
        them as a stream connection."""
        sock: socket.socket = config.userdata.pop("socket")
        instream, outstream = sock.makefile("rb"), sock.makefile("wb")
        sock.close()  # the files keep the connection open; closing both ends it
        return instream, outstream

    def manage(self, pid: int, config: fd.WorkerConfig, op: str) -> None:
        """Nothing to do: the framework sends interrupts as messages."""

    def kill(self, pid: int, config: fd.WorkerConfig) -> None:
        """Ask the worker to exit (EXIT message); signal it if it does not."""
        super().kill(pid, config)
        if config.process is not None:
            threading.Thread(target=escalate_exit, args=(config.process,), daemon=True).start()


def worker_main(fileno: int) -> None:
    """Run in the child: serve the master over the inherited socket until it goes away."""
    cookie = sys.stdin.readline().strip()
    sock = socket.socket(fileno=fileno)
    instream, outstream = sock.makefile("rb"), sock.makefile("wb")
    sock.close()
    fd.init_worker(cookie)
    fd.process_messages(instream, outstream, incoming=True)
    # The worker exits (os._exit) when the master's connection closes; until then the
    # main thread has nothing to do.
    threading.Event().wait()


def demo() -> None:
    pids = fd.addprocs(SocketPairManager(2), topology="master_worker")
    print("workers:", pids)
    print("their pids:", [fd.remotecall_fetch(os.getpid, p) for p in pids])
    # A channel held by the master, filled by a worker ...
    results = fd.RemoteChannel(lambda: fd.Channel(10))
    fd.remotecall_wait(lambda ch: [ch.put(i * i) for i in range(3)], pids[1], results)
    print("from worker", pids[1], ":", [fd.take(results) for _ in range(3)])
    # ... and one held by a worker, filled by the master.
    jobs = fd.RemoteChannel(lambda: fd.Channel(10), pids[0])
    for i in range(3):
        fd.put(jobs, i)
    print("summed on worker", pids[0], ":",
          fd.remotecall_fetch(lambda: sum(fd.take(jobs) for _ in range(3)), pids[0]))
    if hasattr(fd, "pmap"):
        print("pmap:", fd.pmap(lambda x: x + 1, range(6)))
    fd.rmprocs(pids, waitfor=10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(int(sys.argv[2]))
    else:
        demo()
