"""The worker entry point: `python -m fastdist.worker [--cookie C] [--bind-to host[:port]]`.

Prints `fastdist_worker:PORT#HOST` and reads the cookie from stdin when it is
not given; the work itself is in `fastdist.workerproc`.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from fastdist.workerproc import start_worker

    parser = argparse.ArgumentParser(prog="python -m fastdist.worker",
                                     description="Run a fastdist worker process.")
    parser.add_argument("--cookie", help="the cluster cookie (read from stdin when absent)")
    parser.add_argument("--bind-to", help="host[:port] to listen on (default: all, any port)")
    parser.add_argument("--separate-stderr", action="store_true",
                        help="keep stderr apart from stdout (the master relays each)")
    args = parser.parse_args(argv)
    start_worker(cookie=args.cookie, bind_to=args.bind_to,
                 stderr_to_stdout=not args.separate_stderr)


if __name__ == "__main__":
    main()
