"""Browser pages must not drive a server that has no API key (CSRF, DNS rebinding).

A web page can POST to http://127.0.0.1:5000 from any site: a `text/plain` body needs no CORS
preflight, so the model runs although the page never reads the answer (CSRF). With DNS
rebinding, a page's own name (attacker.example) turns into 127.0.0.1 and even reads the answers;
the request then carries `Host: attacker.example:5000`. Two checks, for servers without a key
(a key is a secret no page can send):

- on a loopback bind, only loopback Host names are answered: localhost (and *.localhost),
  127.0.0.0/8, [::1], with any port. text-generation-webui refuses other Hosts the same way
  unless it is told to listen elsewhere. A request without a Host (HTTP/1.0) is not a browser's.
- a request that can change something (anything but GET, HEAD, OPTIONS) from a page whose
  `Origin` is not one of `--cors-origin` is refused, whatever its Content-Type. Browsers send
  `Origin` on every cross-origin POST; apps' own servers (SillyTavern's) send none, and pass.
  A page opened from a file sends `Origin: null`: allow it with `--cors-origin null` (any
  sandboxed frame can send `null` too, so prefer serving the page from a listed origin).
"""

from __future__ import annotations

import ipaddress

from starlette.responses import JSONResponse

from .errors import APIError, api_of_path, error_body

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback_host(host: str) -> bool:
    """`host` (a Host header: name or address, optional port) names this machine's loopback."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        name, _, _ = host[1:].partition("]")
    else:
        name, colon, port = host.rpartition(":")
        if not colon or not port.isdigit():
            name = host
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LocalOnly:
    """ASGI middleware: the Host and Origin checks above, answered in the route's API shape (403)."""

    def __init__(self, app, cors_origins=(), check_host: bool = True, check_origin: bool = True):
        self.app, self.allowed = app, frozenset(cors_origins)
        self.check_host, self.check_origin = check_host, check_origin

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                response = JSONResponse(error_body(api_of_path(scope["path"]), refusal), status_code=refusal.status)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, scope) -> APIError | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"] if k.lower() in (b"host", b"origin")}
        host, origin = headers.get(b"host"), headers.get(b"origin")
        if self.check_host and host is not None and not is_loopback_host(host):
            return APIError(403, f"the Host {host!r} is not a loopback name: this server listens on loopback "
                                 "without an API key and answers only requests to localhost, 127.0.0.1 or "
                                 "[::1] (a page that renamed itself to this address is refused); to serve "
                                 "other names, set --api-key", None, "forbidden_host")
        if (self.check_origin and origin is not None and origin not in self.allowed
                and scope["method"] not in SAFE_METHODS):
            return APIError(403, f"a request from the web page at {origin!r} is refused: this server has no API "
                                 f"key, and pages may use it only from an origin given with --cors-origin "
                                 f"(start it with --cors-origin {origin} to allow this one)", None,
                            "forbidden_origin")
        return None
