"""What an SSH machine specification names: its parts, and the machine ssh goes to.

`parse_machine` splits `[user@]host[:port] [bind_addr[:port]]`. The host may be a
name only ssh knows — a `Host` alias of `~/.ssh/config` (or of a file given with
`-F` in sshflags) whose `HostName` is the real machine. ssh resolves it when it
logs in; the master's own TCP connection to the worker does not go through ssh, so
`ssh_hostname` asks ssh (`ssh -G`, which prints the configuration it would use
without connecting) for the machine behind the name.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """One parsed machine specification: `[user@]host[:port] [bind_addr[:port]]`."""

    spec: str
    user: str | None
    host: str
    port: int | None
    bind_addr: str | None
    bind_port: int | None

    @property
    def destination(self) -> str:
        """What ssh is given as the remote: `user@host` or `host`."""
        return f"{self.user}@{self.host}" if self.user else self.host


def _split_host_port(text: str, spec: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` -> (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid machine specification {spec!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid machine specification {spec!r}: junk after ']'")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        elif ":" in port_text:
            raise ValueError(f"invalid machine specification {spec!r}: invalid port format "
                             "(write an IPv6 address in brackets: [::1]:22)")
    if not host:
        raise ValueError(f"invalid machine specification {spec!r}: no host")
    if port_text is None:
        return host, None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid machine specification {spec!r}: invalid port format "
                         f"{port_text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid machine specification {spec!r}: invalid port number {port}")
    return host, port


def parse_machine(spec: str) -> Machine:
    """Parse `[user@]host[:port] [bind_addr[:port]]` (IPv6 addresses in brackets).

    Args:
        spec: one machine specification.

    Returns:
        The parsed Machine.

    Raises:
        ValueError: the specification is malformed (the message quotes it).

    Example:
        >>> parse_machine("alice@[::1]:2222 10.0.0.5")
        Machine(spec='alice@[::1]:2222 10.0.0.5', user='alice', host='::1', port=2222, \
bind_addr='10.0.0.5', bind_port=None)
    """
    if not isinstance(spec, str):
        raise TypeError(f"a machine specification is a string, not {type(spec).__name__}")
    parts = spec.split()
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"invalid machine specification {spec!r}: expected "
                         "'[user@]host[:port] [bind_addr[:port]]'")
    login = parts[0]
    user, at, hostport = login.rpartition("@")
    if at and not user:
        raise ValueError(f"invalid machine specification {spec!r}: empty user name")
    host, port = _split_host_port(hostport, spec)
    bind_addr = bind_port = None
    if len(parts) == 2:
        bind_addr, bind_port = _split_host_port(parts[1], spec)
    return Machine(spec, user or None, host, port, bind_addr, bind_port)


def is_ip(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 address (not a name)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return True
    return False


def bracket(host: str) -> str:
    """`host` as it goes before `:port` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def ssh_hostname(ssh: str, flags: list[str], destination: str, timeout: float) -> str | None:
    """The machine ssh would connect to for `destination` with `flags` (an alias's
    HostName, or the name itself), as `ssh -G` reports it; None when ssh cannot tell
    (an ssh program without `-G`, or a configuration ssh refuses: the login that
    follows then reports ssh's own words)."""
    try:
        done = subprocess.run([ssh, *flags, "-G", destination], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False,
                              start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    for line in done.stdout.decode(errors="replace").splitlines():
        key, _, value = line.strip().partition(" ")
        if key.lower() == "hostname" and value.strip():
            return value.strip()
    return None


def resolvable(host: str) -> bool:
    """Whether this process can look `host` up (an address always can)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return True
