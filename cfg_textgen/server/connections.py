"""Connections that send no request must not hold the server's sockets (slowloris, idle floods).

uvicorn closes a kept-alive connection that stays silent after a response (`timeout_keep_alive`)
and caps request *size* (h11), but has no time limit for a request's headers: a new connection
that never sends its request, or sends it a byte at a time, stays open for ever, and enough of
them exhaust the process' open files ("Too many open files": then nobody is answered).

`ConnectionGuard.sweep` runs on the server's tick (every 0.1 s) over uvicorn's connections:
- a connection waiting for its request's headers (none begun yet, or the previous response
  sent) for longer than `header_timeout` seconds is closed;
- beyond `max_connections`, the ones waiting longest for headers are closed first, so that a
  real client's new connection always finds room; one just accepted (whose headers the server
  may not have read yet) is left `SETTLE` seconds; a request being answered (a long stream) is
  never closed by either rule.
`raise_open_file_limit` lifts the soft limit on open files to the hard one at start;
`max_connections` stays below it, leaving files for the model and the process itself.
"""

from __future__ import annotations

HEADER_TIMEOUT = 15.0  # seconds; a real client sends its headers in one packet
SETTLE = 0.5  # seconds a new connection has to send its headers before the cap may close it
RESERVED_FILES = 128  # open files kept for the model, logs, threads, pipes


def raise_open_file_limit() -> int:
    """Set the soft RLIMIT_NOFILE to the hard limit (where the platform has one); the new soft limit."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


def default_max_connections(open_files: int) -> int:
    return max(16, min(4096, open_files - RESERVED_FILES))


class ConnectionGuard:
    """Closes connections that wait too long for their request headers, oldest first beyond a cap."""

    def __init__(self, header_timeout: float = HEADER_TIMEOUT, max_connections: int = 1024):
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self._waiting: dict[object, tuple[object, float]] = {}  # connection -> (its last request, since)

    def sweep(self, connections, now: float) -> int:
        """Close what the rules say; how many were closed."""
        waiting: dict[object, tuple[object, float]] = {}
        for conn in connections:
            cycle = getattr(conn, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                continue  # a request is being read or answered
            seen = self._waiting.get(conn)
            waiting[conn] = seen if seen is not None and seen[0] is cycle else (cycle, now)
        late = [conn for conn, (_, since) in waiting.items() if now - since > self.header_timeout]
        excess = len(connections) - len(late) - self.max_connections
        if excess > 0:
            closing = set(late)
            rest = sorted((since, id(conn), conn) for conn, (_, since) in waiting.items()
                          if conn not in closing and now - since >= SETTLE)
            late += [conn for _, _, conn in rest[:excess]]
        for conn in late:
            waiting.pop(conn, None)
            transport = getattr(conn, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        self._waiting = waiting
        return len(late)
