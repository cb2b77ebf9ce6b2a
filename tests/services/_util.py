"""Small process helpers shared by the test services (Linux /proc based)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "install.sh"


def ensure_installed(*binaries: str) -> None:
    """Run install.sh when one of ``binaries`` is missing (it is idempotent).

    Raises RuntimeError with the script's output if the installation fails, so a
    fixture that needs a server fails loudly instead of skipping.
    """
    if all(os.path.exists(b) or shutil.which(b) for b in binaries):
        return
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{INSTALL_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    missing = [b for b in binaries if not (os.path.exists(b) or shutil.which(b))]
    if missing:
        raise RuntimeError(f"still missing after {INSTALL_SCRIPT}: {missing}")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{what} needs root (running as uid {os.geteuid()})")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is as good as dead
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def read_pidfile(path: str | os.PathLike) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppid_map() -> dict[int, int]:
    result = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            ppid = int(data.rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        result[int(entry)] = ppid
    return result


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first, then grandchildren ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppid_map().items():
        children.setdefault(parent, []).append(child)
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_pids(pids, grace: float = 2.0) -> None:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, then SIGKILL survivors."""
    pids = [p for p in dict.fromkeys(pids) if p > 0 and p != os.getpid()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return
        time.sleep(0.02)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p)]
        time.sleep(0.02)


def kill_tree(pid: int, grace: float = 2.0) -> None:
    """Kill ``pid`` and every process below it."""
    if pid <= 0:
        return
    tree = descendants(pid)
    kill_pids([pid, *tree], grace=grace)
    # processes forked while we were killing the parent
    kill_pids(descendants(pid), grace=grace)


def run(argv, *, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output and a readable error."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed (exit {proc.returncode}): {' '.join(map(str, argv))}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def tail(path: str | os.PathLike, limit: int = 6000) -> str:
    try:
        data = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return data[-limit:]
