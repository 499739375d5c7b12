"""Reading a request's body within a size limit and a time limit.

A client may send its headers and then its body slowly, or never finish it. uvicorn (h11) has no
time limit for a body (its `timeout_keep_alive` counts only between requests, and ConnectionGuard
only connections waiting for headers), so such a request would hold its connection and its
handler for ever. The rule, after Apache's mod_reqtimeout (`body=20,MinRate=500`):

    deadline = start + body_timeout + received_bytes / MIN_RATE

so a body that keeps coming at a modem's pace is read to its end, and one that stalls or trickles
(a byte at a time) is answered 408 once the deadline passes, and its connection closed. llama.cpp
server's `--timeout` (600 s between reads) and KoboldCpp's plain http.server have no rate rule.
"""

from __future__ import annotations

import anyio
from starlette.requests import ClientDisconnect, Request

from .errors import APIError

MAX_BODY = 10 * 1024 * 1024  # bytes; a story plus its negative prompt is a few hundred KB at most
BODY_TIMEOUT = 30.0  # seconds for a body, more as its bytes arrive
MIN_RATE = 500  # bytes per second that earn a body more time


async def read_body(request: Request, timeout: float = BODY_TIMEOUT) -> bytes:
    """The body (any transfer encoding: Content-Length or chunked); a 413 past MAX_BODY, a 408
    (with `Connection: close`) when it has not arrived by the deadline."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY}", None,
                       "body_too_large")
    raw = bytearray()
    start = anyio.current_time()
    deadline = start + timeout
    while True:
        with anyio.move_on_after(deadline + len(raw) / MIN_RATE - anyio.current_time()):
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            raw += message.get("body", b"")
            if len(raw) > MAX_BODY:
                raise APIError(413, f"the request body is larger than the {MAX_BODY}-byte limit", None,
                               "body_too_large")
            if not message.get("more_body", False):
                return bytes(raw)
            continue
        raise APIError(408, f"the request body did not arrive in time: {len(raw)} bytes in "
                            f"{anyio.current_time() - start:.0f} s (the limit is {timeout:g} s, plus 1 s per "
                            f"{MIN_RATE} bytes received)", None, "request_timeout", headers={"Connection": "close"})
