"""One line per request on stderr, so a writer sees what their app sends, and the
`X-Skipped-Samplers` header that names the sampler-order entries a request's app knows and we do
not (they are skipped, as text-generation-webui and KoboldCpp skip them):

    POST /v1/completions 200 prompt=812 new=48 cached=770+770 3.21s skipped=banana_sampler
    GET /v1/models 200 0.00s

The handlers leave what they know in the request's state (Starlette's `request.state`, the
scope's "state" dict): `skipped_samplers` before the response starts, `jobs` (their token counts
are read as the response's last bytes go out, so a stream's count is its final one; `cached` is the
prompt tokens that the prompt cache held and were not read again: the story's, then with CFG "+"
the opposing prompt's) and `prompt_tokens` (the tokens the model saw, after every cut). The line is
written before those last bytes, so a client holding its whole answer finds its line logged; a
response that breaks off (the client left) is logged when it ends.
"""

from __future__ import annotations

import time

from starlette.datastructures import MutableHeaders

SKIPPED_HEADER = "X-Skipped-Samplers"


class RequestLog:
    """ASGI middleware: the header always, the log line when `log` is a callable (None: quiet)."""

    def __init__(self, app, log=None):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        started, status, logged = time.perf_counter(), [0], [self.log is None]

        def write_line():
            if not logged[0]:
                logged[0] = True
                self.log(log_line(scope["method"], scope["path"], status[0], state, time.perf_counter() - started))

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if state.get("skipped_samplers"):
                    MutableHeaders(scope=message).append(SKIPPED_HEADER, ", ".join(shown(state["skipped_samplers"])))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                write_line()  # before the last bytes: a client that has its answer finds the line written
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            write_line()  # no response, or it broke off


def shown(names, longest: int = 64, most: int = 16) -> list[str]:
    """The skipped names as a header and a log line can carry them: the request's own strings, so
    control characters and non-ASCII are escaped (`\\x00`, `\\xe9`: a raw one is an illegal header
    value and would cost the client its answer), each cut to `longest` characters and at most `most`
    of them, then how many more."""
    out = [n.encode("unicode_escape").decode("ascii") for n in names[:most]]
    out = [n if len(n) <= longest else n[:longest - 3] + "..." for n in out]
    return out + ([f"(+{len(names) - most} more)"] if len(names) > most else [])


def cached(jobs) -> str:
    """The prompt tokens the cache held, the story's, then with CFG "+" the opposing prompt's
    (`prompt=` counts the story: "prompt=784 cached=767+767" is a turn that read 17 of each)."""
    rows = max((len(j.cached_rows) for j in jobs), default=1) or 1
    return "+".join(str(sum(j.cached_rows[r] for j in jobs if len(j.cached_rows) > r)) for r in range(rows))


def log_line(method: str, path: str, status: int, state: dict, seconds: float) -> str:
    """`METHOD PATH STATUS [prompt=N new=N cached=N] 1.23s [skipped=a,b]` (status 0: no response was sent)."""
    parts = [method, path, str(status)]
    jobs = state.get("jobs")
    if jobs:
        parts += [f"prompt={state.get('prompt_tokens', 0)}", f"new={sum(len(j.token_ids) for j in jobs)}",
                  f"cached={cached(jobs)}"]
    parts.append(f"{seconds:.2f}s")
    if state.get("skipped_samplers"):
        parts.append("skipped=" + ",".join(shown(state["skipped_samplers"])))
    return " ".join(parts)
