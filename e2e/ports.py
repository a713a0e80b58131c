"""Ports for the servers the end-to-end tests start.

A port is taken from below the kernel's ephemeral range (`ip_local_port_range`), so that between
the moment a test picks it and the moment the server it starts binds it, no socket bound to port 0
(vLLM's own internal sockets, an outgoing connection) can take it, as one picked from the ephemeral
range could: vLLM once failed to start with "Address already in use" on the replay port a test had
just picked. Ports handed out by this process are not handed out again.
"""

import itertools
import os
import socket

LOW = 10000


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HIGH = _ephemeral_low()
# Processes started together begin at different places.
_next = itertools.count((os.getpid() * 2654435761) % max(_HIGH - LOW, 1))


def free_port():
    span = _HIGH - LOW
    if span > 1000:
        for _ in range(min(span, 2000)):
            port = LOW + next(_next) % span
            with socket.socket() as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
