"""Several "hosts" on one machine: network namespaces joined by veth pairs.

    with NetnsHosts(2) as net:
        h = net.hosts[0]           # .name, .addr (10.213.X.2), .host_side_addr (10.213.X.1)
        net.exec(0, ["python3", "-c", "..."])
        net.cut(1); ...; net.restore(1)

Namespace ``i`` gets the subnet 10.213.X.0/24 (X = i + 1 unless another live test
run holds it): the namespace end of its veth pair is 10.213.X.2, the end in this
(root) namespace 10.213.X.1.  Each namespace routes everything through its host
end, and IP forwarding is on while the hosts exist, so a namespace reaches this
machine at any 10.213.*.1 address and the other namespaces at their 10.213.*.2
addresses.  A process on this machine listening on 0.0.0.0 or on a 10.213.X.1
address is reachable from every namespace.

Every 10.213.X.0/24 also gets a low-priority blackhole route, so that while a host
is cut off (its host-side veth down) nothing addressed to it leaves through the
machine's real network: packets from other namespaces are silently dropped (their
connection attempts time out, like a vanished machine) and local connects fail at
once.

Traffic only ever goes between these addresses and this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ._util import ensure_installed, kill_pids, pid_alive, require_root, run

NS_PREFIX = "fdh"
VETH_PREFIX = "fdv"  # host side; the namespace side is "fdp..."
PEER_PREFIX = "fdp"
SUBNET = "10.213"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# the ip_forward value from before the first live run turned it on; survives crashes
SAVED_FORWARD = Path("/run/fastdist-test-netns.ip_forward")
_NAME_RE = re.compile(rf"^(?:{NS_PREFIX}|{VETH_PREFIX}|{PEER_PREFIX})(\d+)_(\d+)")


@dataclass
class NetnsHost:
    index: int
    name: str  # network namespace name
    addr: str  # the host's own address (inside the namespace)
    host_side_addr: str  # this machine's address on the link to it
    veth: str  # host-side veth device (cut/restore act on it)
    peer: str  # namespace-side veth device
    octet: int
    sshd: Any = None  # set by whoever runs an SSHServer there
    extra: dict = field(default_factory=dict)

    def exec_argv(self, argv) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]


def _ns_list() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = run(["ip", "-o", "link", "show"]).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _used_octets() -> set[int]:
    out = run(["ip", "-o", "-4", "addr", "show"]).stdout
    used = {int(m.group(1)) for m in re.finditer(rf"inet {re.escape(SUBNET)}\.(\d+)\.", out)}
    routes = run(["ip", "-4", "route", "show"]).stdout
    used |= {int(m.group(1)) for m in re.finditer(rf"{re.escape(SUBNET)}\.(\d+)\.0/24", routes)}
    return used


def _ns_pids(ns: str) -> list[int]:
    p = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _delete_ns(ns: str) -> None:
    kill_pids(_ns_pids(ns), grace=1.0)
    run(["ip", "netns", "del", ns], check=False)


def _delete_link(dev: str) -> None:
    run(["ip", "link", "del", dev], check=False)


def _live_runs() -> set[int]:
    pids = {int(m.group(1)) for ns in _ns_list() if (m := _NAME_RE.match(ns))}
    return {p for p in pids if p != os.getpid() and pid_alive(p)}


def cleanup_stale() -> None:
    """Delete namespaces, veths and routes left by test runs whose process is gone."""
    require_root("NetnsHosts.cleanup_stale")
    for ns in _ns_list():
        m = _NAME_RE.match(ns)
        if m and ns.startswith(NS_PREFIX) and not pid_alive(int(m.group(1))):
            _delete_ns(ns)
    for dev in _links():
        m = _NAME_RE.match(dev)
        if m and not pid_alive(int(m.group(1))):
            _delete_link(dev)
    live_octets = {
        int(m.group(1))
        for m in re.finditer(
            rf"inet {re.escape(SUBNET)}\.(\d+)\.",
            run(["ip", "-o", "-4", "addr", "show"]).stdout,
        )
    }
    for line in run(["ip", "-4", "route", "show"]).stdout.splitlines():
        m = re.match(rf"blackhole ({re.escape(SUBNET)}\.(\d+)\.0/24)", line)
        if m and int(m.group(2)) not in live_octets:
            run(["ip", "route", "del", "blackhole", m.group(1)], check=False)
    _restore_forwarding()


def _enable_forwarding() -> None:
    if not SAVED_FORWARD.exists():
        SAVED_FORWARD.write_text(IP_FORWARD.read_text())
    IP_FORWARD.write_text("1\n")


def _restore_forwarding() -> None:
    """Put ip_forward back once no live run has namespaces any more."""
    if _live_runs() or not SAVED_FORWARD.exists():
        return
    IP_FORWARD.write_text(SAVED_FORWARD.read_text().strip() + "\n")
    SAVED_FORWARD.unlink()


class NetnsHosts:
    """``n`` network namespaces reachable from here and from each other."""

    def __init__(self, n: int = 2) -> None:
        if not 1 <= n <= 50:
            raise ValueError("n must be between 1 and 50")
        self.n = n
        self.hosts: list[NetnsHost] = []
        self._routes: list[str] = []
        self._started = False

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> NetnsHosts:
        require_root("NetnsHosts")
        ensure_installed("/usr/sbin/ip", "/usr/bin/pkill")
        cleanup_stale()
        self._started = True
        try:
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        pid = os.getpid()
        used = _used_octets()
        octets = [o for o in range(1, 255) if o not in used][: self.n]
        if len(octets) < self.n:
            raise RuntimeError(f"no free {SUBNET}.X.0/24 subnets left")
        for i, octet in enumerate(octets):
            h = NetnsHost(
                index=i,
                name=f"{NS_PREFIX}{pid}_{i}",
                addr=f"{SUBNET}.{octet}.2",
                host_side_addr=f"{SUBNET}.{octet}.1",
                veth=f"{VETH_PREFIX}{pid}_{i}",
                peer=f"{PEER_PREFIX}{pid}_{i}",
                octet=octet,
            )
            self.hosts.append(h)
            ns = ["ip", "netns", "exec", h.name]
            run(["ip", "netns", "add", h.name])
            run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.peer])
            run(["ip", "link", "set", h.peer, "netns", h.name])
            run(["ip", "addr", "add", f"{h.host_side_addr}/24", "dev", h.veth])
            run(["ip", "link", "set", h.veth, "up"])
            run([*ns, "ip", "addr", "add", f"{h.addr}/24", "dev", h.peer])
            run([*ns, "ip", "link", "set", h.peer, "up"])
            run([*ns, "ip", "link", "set", "lo", "up"])
            run([*ns, "ip", "route", "add", "default", "via", h.host_side_addr])
            subnet = f"{SUBNET}.{octet}.0/24"
            run(["ip", "route", "add", "blackhole", subnet, "metric", "4000"])
            self._routes.append(subnet)
        _enable_forwarding()

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        errors = []
        for h in self.hosts:
            srv = h.sshd
            h.sshd = None
            if srv is not None and hasattr(srv, "stop"):
                try:
                    srv.stop()
                except Exception as e:  # noqa: BLE001 -- keep tearing down the rest
                    errors.append(f"{h.name} sshd: {e}")
        for h in self.hosts:
            _delete_ns(h.name)
            _delete_link(h.veth)
        for subnet in self._routes:
            run(["ip", "route", "del", "blackhole", subnet], check=False)
        self._routes.clear()
        # another live run may still need forwarding; it restores the value itself
        _restore_forwarding()
        leftovers = [h.name for h in self.hosts if h.name in _ns_list()]
        leftovers += [h.veth for h in self.hosts if h.veth in _links()]
        self.hosts = []
        if leftovers:
            errors.append(f"could not delete {leftovers}")
        if errors:
            raise RuntimeError("NetnsHosts cleanup: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- operations -----------------------------------------------------------------

    def __getitem__(self, i: int) -> NetnsHost:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def cut(self, i: int) -> None:
        """Take host ``i`` off the network (host-side link down)."""
        run(["ip", "link", "set", self.hosts[i].veth, "down"])

    def restore(self, i: int) -> None:
        """Bring host ``i`` back after cut()."""
        h = self.hosts[i]
        run(["ip", "link", "set", h.veth, "up"])
        # the connected route comes back with the link; make sure it did
        routes = run(["ip", "-4", "route", "show", "dev", h.veth]).stdout
        if f"{SUBNET}.{h.octet}.0/24" not in routes:
            run(["ip", "addr", "replace", f"{h.host_side_addr}/24", "dev", h.veth])

    @contextlib.contextmanager
    def cut_off(self, i: int):
        """``with net.cut_off(i): ...`` -- host ``i`` is unreachable inside the block."""
        self.cut(i)
        try:
            yield self.hosts[i]
        finally:
            self.restore(i)

    def start_sshd(self, **kwargs) -> None:
        """Start an SSHServer in every namespace, bound to its address (``host.sshd``)."""
        from .sshd import SSHServer

        for h in self.hosts:
            if h.sshd is None:
                h.sshd = SSHServer(host=h.addr, netns=h.name, **kwargs).start()

    @property
    def sshds(self) -> list:
        return [h.sshd for h in self.hosts]

    def is_cut(self, i: int) -> bool:
        out = run(["ip", "-o", "link", "show", self.hosts[i].veth]).stdout
        flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
        return "UP" not in flags

    def exec(self, i: int, argv, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside host ``i``'s namespace (captured text output)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("check", False)
        return subprocess.run(self.hosts[i].exec_argv(argv), **kwargs)

    def popen(self, i: int, argv, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``i``'s namespace; the caller waits for it."""
        return subprocess.Popen(self.hosts[i].exec_argv(argv), **kwargs)
