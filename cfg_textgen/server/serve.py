"""Run the server process: load the model, serve on uvicorn, shut down cleanly on SIGTERM.

SIGTERM (and Ctrl-C): stop accepting connections; requests still waiting in the queue get a 503
at once; running generations may finish for `grace` seconds, then they are cancelled, so every
stream still ends with its last event (finish_reason "cancelled") and `[DONE]`; then the
scheduler closes and the process exits 0. uvicorn re-raises a captured signal after its own
shutdown (so the process would die "by SIGTERM"); `_Server` keeps the graceful part and drops
the re-raise. Its tick also runs the ConnectionGuard (connections.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings

GRACE = 30.0  # seconds running generations get to finish after SIGTERM
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY_ENV = "CFG_TEXTGEN_API_KEY"


def check_api_key(key: str | None) -> str | None:
    """HTTP headers carry printable ASCII only (clients encode others differently or refuse them):
    a key with other characters could never be sent, so it is refused at start."""
    if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key):
        raise ValueError("the API key must be printable ASCII without spaces at either end (HTTP "
                         "headers carry nothing else reliably)")
    return key


def serve(host: str = "127.0.0.1", port: int = 5000, model: str | None = None, backend: str | None = None,
          runtime=None, api_key: str | None = None, cors_origins: tuple[str, ...] = (), parallel: int | None = None,
          log=lambda msg: print(msg, file=sys.stderr, flush=True), quiet: bool = False,
          defaults=None, max_queue: int = 16, grace: float = GRACE, header_timeout: float | None = None,
          max_connections: int | None = None, body_timeout: float | None = None) -> int:
    """Serve until SIGTERM; every request gets a line on `log` unless `quiet`; `defaults`: the
    ServerDefaults every request gets unless it says otherwise."""
    import uvicorn

    from .app import create_app
    from .connections import HEADER_TIMEOUT, ConnectionGuard, default_max_connections, raise_open_file_limit
    from .defaults import ServerDefaults
    from .reading import BODY_TIMEOUT
    from .scheduling import Service

    api_key = check_api_key(api_key or os.environ.get(API_KEY_ENV) or None)
    if host not in LOOPBACK and not api_key:
        log(f"warning: serving on {host} without an API key: anyone who can reach this port can use "
            f"the model. Set --api-key or {API_KEY_ENV}.")
    open_files = raise_open_file_limit()
    limit = default_max_connections(open_files)
    if max_connections is not None and max_connections > limit:
        log(f"warning: --max-connections {max_connections} is above what {open_files} open files allow; "
            f"using {limit}")
    guard = ConnectionGuard(HEADER_TIMEOUT if header_timeout is None else header_timeout,
                            limit if max_connections is None else min(max_connections, limit))
    defaults = defaults or ServerDefaults()
    service = Service(model, backend=backend, parallel=parallel, runtime=runtime, log=log, defaults=defaults,
                      max_queue=max_queue)
    chosen = service.scheduler.max_parallel
    log(f"model {service.model_name} ready ({service.backend_name}; up to {chosen} requests decoded "
        f"together{' (--parallel auto)' if parallel is None else ''}, {max_queue} waiting; "
        f"context {service.n_ctx} tokens)")
    memory = kv_memory_line(service.backend, chosen)
    if memory:
        log(memory)
    if not defaults.empty:
        log(defaults.describe())
    app = create_app(service, api_key=api_key, cors_origins=cors_origins, request_log=None if quiet else log,
                     loopback=host in LOOPBACK, body_timeout=BODY_TIMEOUT if body_timeout is None else body_timeout)
    # uvicorn's own deadline comes after ours: by then every generation has been cancelled and
    # its stream has ended, so uvicorn never has to cut a response
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace + 10, lifespan="off")
    server = _Server(config, service, guard, grace)
    log(f"serving the text-generation-webui API at http://{_show(host)}:{port}/v1 and the KoboldAI "
        f"API at http://{_show(host)}:{port}/api")
    try:
        with warnings.catch_warnings():
            _log_our_warnings(log)
            server.run()
    finally:
        service.close(finish=False)  # anything still running after the grace period ends now
    log("server stopped")
    return 0


def _log_our_warnings(log) -> None:
    """The package's own warnings about a request (an opposing prompt cut to the window) go to the
    log as `warning: ...` lines, every time, not once per source line with Python's file:line
    heading; other libraries' warnings keep Python's format. For the duration of a
    `warnings.catch_warnings()` block."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            log(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.filterwarnings("always", category=UserWarning, module=r"cfg_textgen(\.|$)")


def kv_memory_line(backend, parallel: int) -> str | None:
    """What the llama.cpp KV cache of `parallel` requests takes (None on transformers, whose
    caches grow with each request)."""
    kv_bytes = getattr(backend, "kv_bytes", None)
    if kv_bytes is None:
        return None
    rt = backend.runtime
    return (f"KV cache: {kv_bytes() / 2**20:,.0f} MiB for --parallel {parallel} ({parallel} requests x "
            f"2 sequences (story, opposing prompt) x {backend.seq_cells} tokens, K {rt.cache_type_k} / "
            f"V {rt.cache_type_v}); --ctx-size and --cache-type-k/-v q8_0 make it smaller, --parallel N sets "
            f"how many requests run at once")


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, service, guard, grace: float):
            super().__init__(config)
            self.service, self.guard, self.grace = service, guard, grace
            self._stopping = False

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean stop, not a death by signal: exit 0
            if not self._stopping:
                # in a thread: a signal handler must not take locks the interrupted code may hold
                self._stopping = True
                threading.Thread(target=self._wind_down, daemon=True, name="cfg-textgen-shutdown").start()

        def _wind_down(self):
            self.service.stop_taking()  # the waiting requests get their 503 now
            time.sleep(self.grace)
            self.service.cancel_all()  # the running ones end with their last event

        async def on_tick(self, counter: int) -> bool:
            self.guard.sweep(self.server_state.connections, time.monotonic())
            return await super().on_tick(counter)

    return Server


def _Server(config, service, guard, grace):
    return _server_class()(config, service, guard, grace)
