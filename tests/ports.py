"""Ports on 127.0.0.1 that nothing listens on, for the servers and process groups tests start."""

from __future__ import annotations

import socket
from typing import List


def free_ports(count: int) -> List[int]:
    """``count`` distinct ports, all bound at once so that none is handed out twice, then released."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]
