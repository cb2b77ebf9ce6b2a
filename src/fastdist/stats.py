"""Observability: per-peer message and byte counters, and how many values a process owns."""

from __future__ import annotations

from typing import Any

from fastdist import node as _node


def _local_stats() -> dict[str, Any]:
    return _node.current().local_stats()


def stats(pid: int | None = None) -> dict[str, Any]:
    """Counters of process `pid` (default: this one).

    Returns:
        ``{"pid": pid, "peers": {peer_pid: {"msgs_sent", "bytes_sent", "writes",
        "msgs_received", "bytes_received", "shm", "shm_segments", "shm_mapped",
        "shm_msgs_sent", "shm_bytes_sent"}}, "refs": n}`` — a peer appears once a
        connection to it exists; `refs` counts the Future and RemoteChannel values
        the process holds. `writes` counts the write system calls that sent those
        messages: small frames sent close together share one.
        `shm` says whether large buffers to that peer go through shared memory (same
        host, see docs/ARCHITECTURE.md), `shm_segments` how many segments this
        process keeps for it, `shm_mapped` how many of the peer's it maps,
        `shm_msgs_sent` / `shm_bytes_sent` what went that way (those bytes are not
        in `bytes_sent`).

    Example:
        >>> fd.stats(2)["peers"][1]["msgs_received"] > 0
        True
    """
    n = _node.current()
    if pid is None or int(pid) == n.myid:
        return _local_stats()
    from fastdist.remotecall import remotecall_fetch

    return remotecall_fetch(_local_stats, int(pid))  # type: ignore[no-any-return]
