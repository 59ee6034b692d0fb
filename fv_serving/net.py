"""Addresses on this machine: free ports, URL hosts, waiting for a listener."""

from __future__ import annotations

import socket
import time


def free_port(host: str) -> int:
    """A port the OS reports free on `host` right now (a caller must still handle losing a race for it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True once something accepts TCP connections on host:port, False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((url_host(host).strip("[]"), port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
