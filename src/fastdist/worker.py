"""The worker entry point: `python -m fastdist.worker [--cookie C] [--bind-to host[:port]]`.

Prints `fastdist_worker:PORT#HOST` and reads the cookie from stdin when it is
not given; the work itself is in `fastdist.workerproc`. With `--count N` it starts
N workers on this host from one interpreter (`fastdist.hostspawn`). With `--join HOST:PORT`
the worker instead joins a master's ElasticManager by itself (`fastdist.workerjoin`),
its cookie from FASTDIST_COOKIE or stdin.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdist.worker",
                                     description="Run a fastdist worker process.")
    parser.add_argument("--cookie", help="the cluster cookie (read from stdin when absent)")
    parser.add_argument("--bind-to", help="host[:port] to listen on (default: all, any port)")
    parser.add_argument("--separate-stderr", action="store_true",
                        help="keep stderr apart from stdout (the master relays each)")
    parser.add_argument("--count", type=int, default=1, metavar="N",
                        help="start N workers on this host, forked from this process, "
                             "their output lines labelled `INDEX: ` (one ssh session per host)")
    parser.add_argument("--join", metavar="HOST:PORT",
                        help="join the master listening there (an ElasticManager); the "
                             "cookie comes from FASTDIST_COOKIE or stdin")
    parser.add_argument("--mpi", action="store_true",
                        help="with --join: initialise MPI (mpi4py) first, as MPIManager's "
                             "workers do")
    args = parser.parse_args(argv)
    if args.join:
        if args.cookie:
            parser.error("--join takes the cookie from FASTDIST_COOKIE or stdin, never "
                         "from the command line")
        from fastdist.workerjoin import join_cluster

        join_cluster(args.join, bind_to=args.bind_to, mpi=args.mpi)
        return
    if args.mpi:
        parser.error("--mpi goes with --join")
    if args.count != 1:
        if args.count < 1 or args.cookie:
            parser.error("--count takes a positive number, and the cookie from stdin")
        from fastdist.hostspawn import spawn_workers

        spawn_workers(args.count, bind_to=args.bind_to, separate_stderr=args.separate_stderr)
        return
    from fastdist.workerproc import start_worker

    start_worker(cookie=args.cookie, bind_to=args.bind_to,
                 stderr_to_stdout=not args.separate_stderr)


if __name__ == "__main__":
    main()
