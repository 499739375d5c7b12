"""The ASGI app: both APIs' routes over one Service, the API key, the body limit and CORS.

Every handler's failure is a JSON error in its API's shape (errors.py); nothing a client sends
takes the process down. Generation runs on the Scheduler's thread; handlers wait for it without
blocking the event loop, and a client that goes away cancels its jobs (streaming or not).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from functools import partial

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import CFGTextgenError, SchedulerClosed
from . import kobold, webui
from .bodies import read
from .errors import (KOBOLD, WEBUI, APIError, api_of_path, bad, error_body, first_non_finite,
                     from_engine_error)
from .requestlog import SKIPPED_HEADER, RequestLog

MAX_BODY = 10 * 1024 * 1024  # bytes; a story plus its negative prompt is a few hundred KB at most


# ---- request bodies ---------------------------------------------------------------------------


async def read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY}", None,
                       "body_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise APIError(413, f"the request body is larger than the {MAX_BODY}-byte limit", None,
                           "body_too_large")
    try:
        body = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} "
                            f"column {err.colno}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, but is {type(body).__name__}")
    field = first_non_finite(body)
    if field is not None:
        raise bad(field, "must be a finite number (NaN and Infinity are not JSON)", body[field])
    return body


def submit(service, length_field: str, prompt, preset, seed, **kw):
    """service.submit, with the engine's refusals (too long, ...) as a 400 naming the field the
    engine's typed error is about, and a closing server as a 503."""
    try:
        return service.submit(prompt, preset, seed, **kw)
    except SchedulerClosed as err:
        raise APIError(503, str(err), None, "unavailable") from None
    except (ValueError, CFGTextgenError) as err:
        raise from_engine_error(err, length_field) from None


# ---- waiting for jobs, noticing disconnects -------------------------------------------------


async def pieces_of(jobs):
    """(index, piece) as the jobs produce text; (index, None) when job `index` has ended."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def pump(i, job):
        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass
        for piece in job.pieces():
            put((i, piece))
        job.wait()
        put((i, None))

    for i, job in enumerate(jobs):
        threading.Thread(target=pump, args=(i, job), daemon=True, name="cfg-textgen-pump").start()
    left = len(jobs)
    while left:
        i, piece = await queue.get()
        left -= piece is None
        yield i, piece


async def wait_or_cancel(request: Request, jobs) -> bool:
    """Wait for the jobs; if the client disconnects first, cancel them. True if all finished."""
    finished = False
    async with anyio.create_task_group() as tg:
        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    for job in jobs:
                        job.cancel()
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        for job in jobs:
            await anyio.to_thread.run_sync(job.wait, abandon_on_cancel=True)
        finished = True
        tg.cancel_scope.cancel()
    return finished


class EventStream(StreamingResponse):
    """SSE that watches for the client's disconnect while streaming (Starlette only does that for
    old ASGI servers); the body generator is cancelled then, and its `finally` cancels the jobs."""

    media_type = "text/event-stream"

    def __init__(self, content):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def run(func):
                await func()
                tg.cancel_scope.cancel()

            tg.start_soon(run, partial(self.stream_response, send))
            await run(partial(self.listen_for_disconnect, receive))


def _error_of(job) -> APIError:
    return APIError(500, f"generation failed: {job.error}", None, "generation_error")


# ---- text-generation-webui API ----------------------------------------------------------------


async def completions(request: Request):
    service = request.app.state.service
    body = await read_json(request)
    c, preset = webui.parse_completion(body, service)
    request.state.skipped_samplers = c.skipped_samplers
    jobs = []
    try:
        for i in range(c.n):
            jobs.append(submit(service, c.length_field, c.prompt, preset,
                               None if c.seed is None else (c.seed + i) % 2**64, ban_eos=c.ban_eos_token,
                               truncate=c.truncate, api=WEBUI))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    prompt_tokens = _used(request, jobs)
    echo = (c.prompt if isinstance(c.prompt, str) else service.detokenize(c.prompt)) if c.echo else ""
    cid, model = webui.new_id(), service.model_name
    if not c.stream:
        if not await wait_or_cancel(request, jobs):
            return JSONResponse({})  # the client is gone; nobody reads this
        failed = next((j for j in jobs if j.stop_reason == "error"), None)
        if failed is not None:
            raise _error_of(failed)
        return JSONResponse(webui.completion_response(cid, model, jobs, prompt_tokens, echo))

    async def events():
        try:
            if echo:
                for i in range(len(jobs)):
                    yield _sse(webui.chunk(cid, model, i, echo))
            ended = 0
            async for i, piece in pieces_of(jobs):
                if piece is not None:
                    yield _sse(webui.chunk(cid, model, i, piece))
                    continue
                ended += 1
                job = jobs[i]
                if job.stop_reason == "error":
                    yield _sse(error_body(WEBUI, _error_of(job)))
                    continue
                last = webui.chunk(cid, model, i, "", job.finish_reason)
                if ended == len(jobs):
                    last["usage"] = webui.usage(jobs, prompt_tokens)
                yield _sse(last)
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()  # a no-op for a finished job; frees the slot of a dropped client

    return EventStream(events())


def _used(request: Request, jobs) -> int:
    """The prompt tokens the model saw (after the client's and the window's cuts), for `usage` and
    the request log, which also counts the jobs' new tokens."""
    request.state.jobs = jobs
    request.state.prompt_tokens = jobs[0].stats.kept_tokens
    return request.state.prompt_tokens


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def models(request: Request):
    return JSONResponse(webui.models_response(request.app.state.service))


async def model_detail(request: Request):
    service = request.app.state.service
    if request.path_params["model"] != service.model_name:
        raise APIError(404, f"model {request.path_params['model']!r} is not loaded; this server runs "
                            f"{service.model_name!r}", "model", "model_not_found")
    return JSONResponse(webui.models_response(service)["data"][0])


async def model_info(request: Request):
    return JSONResponse(webui.model_info_response(request.app.state.service))


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def encode(request: Request):
    service = request.app.state.service
    tokens = service.tokenize(read(webui.TextBody, await read_json(request)).text)
    return JSONResponse({"tokens": tokens, "length": len(tokens)})


async def decode(request: Request):
    service = request.app.state.service
    tokens = read(webui.TokensBody, await read_json(request), vocab_size=service.vocab_size).tokens
    return JSONResponse({"text": service.detokenize(tokens)})


async def token_count(request: Request):
    service = request.app.state.service
    text = read(webui.TextBody, await read_json(request)).text
    return JSONResponse({"length": len(service.tokenize(text))})


async def stop_generation(request: Request):
    # the web UI's stop is global (one model, one generation); here it ends every web UI job
    request.app.state.service.cancel(api=WEBUI)
    return JSONResponse("OK")


# ---- KoboldAI API (KoboldCpp) -----------------------------------------------------------------


def _kobold_job(request: Request, body: dict):
    service = request.app.state.service
    g, preset = kobold.parse_generate(body, service)
    request.state.skipped_samplers = g.skipped_samplers
    job = submit(service, "max_length", g.prompt, preset, g.sampler_seed,
                 ban_eos=g.bans_eos, truncate=g.truncate, api=KOBOLD, genkey=g.genkey)
    return job, _used(request, [job])


async def kobold_generate(request: Request):
    job, prompt_tokens = _kobold_job(request, await read_json(request))
    if not await wait_or_cancel(request, [job]):
        return JSONResponse({})
    if job.stop_reason == "error":
        raise _error_of(job)
    return JSONResponse(kobold.generate_response(job, prompt_tokens))


async def kobold_stream(request: Request):
    job, _ = _kobold_job(request, await read_json(request))

    async def events():
        try:
            async for _, piece in pieces_of([job]):
                if piece is not None:
                    yield _kobold_event({"token": piece, "finish_reason": None})
                elif job.stop_reason == "error":
                    yield _kobold_event(error_body(KOBOLD, _error_of(job)))
                else:
                    yield _kobold_event({"token": "", "finish_reason": job.finish_reason})
        finally:
            job.cancel()

    return EventStream(events())


def _kobold_event(data: dict) -> str:
    return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def kobold_abort(request: Request):
    body = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
    genkey = read(kobold.AbortBody, body).genkey
    n = request.app.state.service.cancel(api=KOBOLD, genkey=genkey or None)
    return JSONResponse({"success": "true" if n else "false", "done": "true"})


async def kobold_tokencount(request: Request):
    service = request.app.state.service
    ids = service.tokenize(read(kobold.TokenCountBody, await read_json(request)).prompt)
    return JSONResponse({"value": len(ids), "ids": ids})


async def kobold_perf(request: Request):
    # KoboldCpp's status route (Kobold Lite polls it): `idle` 1 when nothing runs, `queue` waiting
    service = request.app.state.service
    running = service.running()
    return JSONResponse({"total_gens": getattr(service, "total", 0), "queue": max(0, running - 1),
                         "idle": int(running == 0), "backend": service.backend_name})


async def kobold_model(request: Request):
    return JSONResponse({"result": f"koboldcpp/{request.app.state.service.model_name}"})


async def kobold_info_version(request: Request):
    return JSONResponse({"result": "1.2.5"})  # the KoboldAI API version KoboldCpp reports


async def kobold_extra_version(request: Request):
    return JSONResponse(kobold.version_response(bool(request.app.state.api_key)))


async def kobold_max_context(request: Request):
    return JSONResponse({"value": request.app.state.service.n_ctx})


async def kobold_max_length(request: Request):
    return JSONResponse({"value": kobold.DEFAULT_MAX_LENGTH})


# ---- errors, auth ---------------------------------------------------------------------------


async def _api_error(request: Request, err: APIError):
    return JSONResponse(error_body(api_of_path(request.url.path), err), status_code=err.status)


async def _http_error(request: Request, err: HTTPException):
    what = {404: "no such route", 405: "method not allowed on this route"}.get(err.status_code, err.detail)
    return await _api_error(request, APIError(err.status_code, f"{what}: {request.method} {request.url.path}"))


async def _crash(request: Request, err: Exception):
    return await _api_error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))


class APIKey:
    """Every route needs `Authorization: Bearer KEY` or `x-api-key: KEY` when a key is set."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offered = [headers.get("x-api-key", "")]
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        ok = any(k and hmac.compare_digest(k.encode(), self.key.encode()) for k in offered)
        if not ok:
            api = api_of_path(scope["path"])
            err = APIError(401, "a valid API key is required: send `Authorization: Bearer KEY` or "
                                "`x-api-key: KEY`", None, "invalid_api_key" if api == WEBUI else "unauthorized")
            response = JSONResponse(error_body(api, err), status_code=401)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(service, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
               request_log=None) -> Starlette:
    """The app; `request_log` (a callable taking a line, e.g. printing to stderr) logs every request."""
    routes = [
        Route("/v1/models", models), Route("/v1/models/{model:path}", model_detail),
        Route("/v1/internal/model/info", model_info), Route("/v1/internal/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/internal/encode", encode, methods=["POST"]),
        Route("/v1/internal/decode", decode, methods=["POST"]),
        Route("/v1/internal/token-count", token_count, methods=["POST"]),
        Route("/v1/internal/stop-generation", stop_generation, methods=["POST"]),
        Route("/api/v1/model", kobold_model), Route("/api/v1/info/version", kobold_info_version),
        Route("/api/extra/version", kobold_extra_version),
        Route("/api/v1/config/max_context_length", kobold_max_context),
        Route("/api/extra/true_max_context_length", kobold_max_context),
        Route("/api/v1/config/max_length", kobold_max_length),
        Route("/api/v1/generate", kobold_generate, methods=["POST"]),
        Route("/api/extra/generate/stream", kobold_stream, methods=["POST"]),
        Route("/api/extra/abort", kobold_abort, methods=["POST"]),
        Route("/api/extra/tokencount", kobold_tokencount, methods=["POST"]),
        Route("/api/extra/perf", kobold_perf),
    ]
    middleware = []
    if cors_origins:  # outermost, so that a browser's preflight (which carries no key) is answered
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=[SKIPPED_HEADER]))
    middleware.append(Middleware(RequestLog, log=request_log))  # outside the key check: 401s are logged too
    middleware.append(Middleware(APIKey, key=api_key))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _crash})
    app.state.service = service
    app.state.api_key = api_key
    return app
