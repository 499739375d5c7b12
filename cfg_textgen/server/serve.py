"""Run the server process: load the model, serve on uvicorn, shut down cleanly on SIGTERM.

SIGTERM (and Ctrl-C): stop accepting connections, let running generations finish (up to
`GRACE` seconds, then cancel them), close the scheduler, exit 0. uvicorn re-raises a captured
signal after its own shutdown (so the process would die "by SIGTERM"); `_Server` keeps the
graceful part and drops the re-raise.
"""

from __future__ import annotations

import os
import sys

GRACE = 30.0  # seconds running generations get to finish after SIGTERM
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY_ENV = "CFG_TEXTGEN_API_KEY"


def serve(host: str = "127.0.0.1", port: int = 5000, model: str | None = None, backend: str | None = None,
          api_key: str | None = None, cors_origins: tuple[str, ...] = (), parallel: int = 4,
          log=lambda msg: print(msg, file=sys.stderr, flush=True), quiet: bool = False) -> int:
    """Serve until SIGTERM; every request gets a line on `log` unless `quiet`."""
    import uvicorn

    from .app import create_app
    from .scheduling import Service

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in LOOPBACK and not api_key:
        log(f"warning: serving on {host} without an API key: anyone who can reach this port can use "
            f"the model. Set --api-key or {API_KEY_ENV}.")
    service = Service(model, backend=backend, parallel=parallel, log=log)
    log(f"model {service.model_name} ready ({service.backend_name}; up to {parallel} requests decoded "
        f"together; context {service.n_ctx} tokens)")
    app = create_app(service, api_key=api_key, cors_origins=cors_origins, request_log=None if quiet else log)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACE, lifespan="off")
    server = _Server(config)
    log(f"serving the text-generation-webui API at http://{_show(host)}:{port}/v1 and the KoboldAI "
        f"API at http://{_show(host)}:{port}/api")
    try:
        server.run()
    finally:
        service.close(finish=False)  # anything still running after the grace period ends now
    log("server stopped")
    return 0


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean stop, not a death by signal: exit 0

    return Server


def _Server(config):
    return _server_class()(config)
