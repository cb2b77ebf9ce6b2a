"""The `fastdist` command (`python -m fastdist`): start workers, then run a script as `__main__`.

Julia's `julia -p N script.jl` and `julia --machine-file F script.jl`: the
workers are up before the script's first line runs, the script sees its own
`sys.argv`, and every worker is removed when it ends, however it ends.

    fastdist -p 4 script.py arg1 arg2
    fastdist -p auto -c "import fastdist as fd; print(fd.workers())"
    fastdist --machine-file hosts.txt script.py
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

USAGE = """\
usage: fastdist [options] [script.py [args...] | -c command [args...] | -]

Start fastdist workers, then run a Python script (as __main__) on the master.

options:
  -p, --procs N|auto       start N local workers ("auto": one per CPU)
  --machine-file FILE      start workers over ssh on the machines listed in FILE,
                           one spec per line: [N*][user@]host[:port] [bind_addr[:port]]
                           (blank lines and # comments are ignored)
  --sshflags FLAGS         extra ssh arguments for --machine-file, as one string
  -c COMMAND               run COMMAND instead of a script
  -V, --version            print the version and exit
  -h, --help               show this help and exit

With no script (or "-") the program is read from standard input, or an
interactive console starts when standard input is a terminal.
"""


class UsageError(Exception):
    """A command-line mistake: reported with the usage line, exit status 2."""


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Split the command line into fastdist's options and the program's own arguments.

    Options end at the first argument that is not one (the script), as with `python`.

    Raises:
        UsageError: an unknown option or a missing or malformed value.
    """
    opts: dict[str, Any] = {"procs": None, "machine_file": None, "sshflags": None,
                            "command": None, "script": None, "args": [], "action": None}
    i = 0

    def value(name: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise UsageError(f"option {name} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        name, eq, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-h", "--help"):
            opts["action"] = "help"
            return opts
        if arg in ("-V", "--version"):
            opts["action"] = "version"
            return opts
        if name in ("-p", "--procs") or (arg.startswith("-p") and len(arg) > 2):
            text = attached if eq else arg[2:] if arg.startswith("-p") and len(arg) > 2 \
                else value(name)
            opts["procs"] = _parse_procs(text)
        elif name == "--machine-file":
            opts["machine_file"] = attached if eq else value(name)
        elif name == "--sshflags":
            opts["sshflags"] = attached if eq else value(name)
        elif arg == "-c":
            opts["command"] = value(arg)
            opts["args"] = argv[i + 1:]
            return opts
        elif arg == "-" or not arg.startswith("-"):
            opts["script"] = arg
            opts["args"] = argv[i + 1:]
            return opts
        elif arg == "--":
            if i + 1 < len(argv):
                opts["script"] = argv[i + 1]
                opts["args"] = argv[i + 2:]
            return opts
        else:
            raise UsageError(f"unknown option {arg}")
        i += 1
    return opts


def _parse_procs(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"-p takes a number of workers or 'auto', not {text!r}") from None
    if n < 0:
        raise UsageError("-p takes a non-negative number of workers")
    return n


def read_machine_file(path: str) -> list[tuple[str, int]]:
    """The machines listed in a machine file, as `(spec, count)` pairs for addprocs.

    Each line is `[N*][user@]host[:port] [bind_addr[:port]]`; blank lines and
    `#` comments are ignored.

    Raises:
        UsageError: the file cannot be read or a count is malformed.

    Example:
        A file with the lines `4*alice@node1` and `node2:2222` gives
        `[("alice@node1", 4), ("node2:2222", 1)]`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the machine file: {exc}") from None
    machines = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        count = 1
        head, star, rest = line.partition("*")
        if star:
            try:
                count = int(head.strip())
            except ValueError:
                raise UsageError(f"{path}, line {number}: {head.strip()!r} is not a count "
                                 "(write N*host)") from None
            if count < 1:
                raise UsageError(f"{path}, line {number}: the count must be at least 1")
            line = rest.strip()
        machines.append((line, count))
    return machines


def start_workers(opts: dict[str, Any]) -> None:
    """Add the workers the options ask for: local ones first, then the machine file's."""
    import fastdist as fd

    if opts["procs"]:
        fd.addprocs(opts["procs"])
    if opts["machine_file"] is not None:
        machines = read_machine_file(opts["machine_file"])
        if machines:
            kwargs: dict[str, Any] = {}
            if opts["sshflags"]:
                kwargs["sshflags"] = shlex.split(opts["sshflags"])
            fd.addprocs(machines, **kwargs)


def run_program(opts: dict[str, Any]) -> None:
    """Run the script, command or standard input as `__main__`, with its own sys.argv."""
    import runpy

    script, command = opts["script"], opts["command"]
    if command is not None:
        sys.argv = ["-c", *opts["args"]]
        _exec_main(command, "<string>")
    elif script is None or script == "-":
        sys.argv = ["-" if script else "", *opts["args"]]
        if script is None and sys.stdin.isatty():
            import code

            code.interact(banner=console_banner(), local=_fresh_main().__dict__)
        else:
            _exec_main(sys.stdin.read(), "<stdin>")
    else:
        sys.argv = [script, *opts["args"]]
        runpy.run_path(script, init_globals=_predefined(), run_name="__main__")


def console_banner() -> str:
    """What the interactive console says first: Python's greeting, then the cluster."""
    import fastdist as fd

    workers = [p for p in fd.workers() if p != 1]
    if not workers:
        up = "no workers (add some with fd.addprocs(n))"
    else:
        listed = ", ".join(map(str, workers[:8])) + (", ..." if len(workers) > 8 else "")
        up = f"{len(workers)} worker{'s' if len(workers) != 1 else ''} up (pids {listed})"
    return (f"Python {sys.version.split()[0]} on {sys.platform}\n"
            f"fastdist {fd.__version__}: {up}; fastdist is imported as fd.\n"
            f"Try: fd.pmap(lambda x: x * x, range(10))")


def _predefined() -> dict[str, Any]:
    # `julia -p N` loads Distributed into Main; here the program finds `fd` defined.
    import fastdist

    return {"fd": fastdist}


def _fresh_main() -> Any:
    import types

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    main.__dict__.update(_predefined())
    sys.modules["__main__"] = main
    return main


def _exec_main(source: str, filename: str) -> None:
    main = _fresh_main()
    # Running the user's program is the point of this command.
    exec(compile(source, filename, "exec"), main.__dict__)


def stop_workers() -> None:
    """Remove every worker (bounded: a worker that will not go is killed by its manager),
    once they have finished their calls and their output is printed (`farewell`)."""
    import fastdist as fd
    from fastdist import node as _node
    from fastdist.farewell import collect_worker_output

    if _node.peek() is None:
        return
    collect_worker_output()
    live = [p for p in fd.workers() if p != 1]
    if live:
        try:
            fd.rmprocs(live, waitfor=30)
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say what was left
            print(f"fastdist: removing workers failed: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastdist` and `python -m fastdist`; returns the exit status.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        0, the script's `SystemExit` code, 1 after an uncaught exception (its
        traceback is printed), or 2 for a usage error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"fastdist: {exc}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    if opts["action"] == "help":
        print(USAGE, end="")
        return 0
    if opts["action"] == "version":
        from fastdist import __version__

        print(f"fastdist {__version__}")
        return 0
    script = opts["script"]
    if script not in (None, "-") and not os.path.exists(script):
        print(f"fastdist: can't open file {script!r}: no such file", file=sys.stderr)
        return 2
    # As `python script.py` does, and before any worker starts: local workers take
    # the master's sys.path, so modules beside the script import everywhere.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script))
                    if script not in (None, "-") else os.getcwd())
    import fastdist as fd

    try:
        try:
            start_workers(opts)
        except UsageError as exc:
            print(f"fastdist: {exc}", file=sys.stderr)
            return 2
        except fd.ClusterError as exc:
            print(f"fastdist: could not start the workers: {exc}", file=sys.stderr)
            return 1
        run_program(opts)
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        print("\nfastdist: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - report as python would, then clean up
        _print_user_traceback(exc)
        return 1
    finally:
        _flush()
        stop_workers()
    return 0


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback as `python script.py` shows it: without this module's and runpy's frames."""
    import traceback

    tb = exc.__traceback__
    skip = (os.path.abspath(__file__), "runpy.py", "<frozen runpy>")
    while tb is not None and tb.tb_frame.f_code.co_filename.endswith(skip):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
