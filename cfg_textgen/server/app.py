"""The ASGI app: both APIs' routes over one Service, the API key, the body limit and CORS.

Every handler's failure is a JSON error in its API's shape (errors.py); nothing a client sends
takes the process down. Generation runs on the Scheduler's thread; parsing and tokenizing (a 9 MB
prompt takes seconds) run in worker threads, so the event loop keeps answering other clients; a
client that goes away cancels its jobs (streaming or not).

A job that ends cancelled (stop-generation, abort, a shutdown's grace running out) says so:
`finish_reason: "cancelled"` in both APIs. A job the server refused to start because it is
shutting down is a 503, as is a request that finds the queue full (with Retry-After).
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
from . import chat, jsonbody, kobold, logprobs, webui
from .bodies import read
from .errors import KOBOLD, WEBUI, APIError, api_of_path, error_body, from_engine_error
from .origin import LocalOnly
from .reading import BODY_TIMEOUT, read_body
from .requestlog import SKIPPED_HEADER, RequestLog
from .scheduling import SHUTDOWN, shutting_down

# ---- request bodies ---------------------------------------------------------------------------


async def read_json(request: Request, empty: dict | None = None) -> dict:
    """The body (reading.py: size and time limits) as a JSON object, parsed in a worker thread;
    `empty`, when given, stands for a body of no bytes."""
    raw = await read_body(request, request.app.state.body_timeout)
    if empty is not None and not raw.strip():
        return empty
    return await off_loop(jsonbody.parse, raw)


async def off_loop(func, *args, **kw):
    """func(*args, **kw) in a worker thread: tokenizing a long prompt must not stall other clients."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kw))


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
    """(index, piece, tokens so far) as the jobs produce text; (index, None, None) when job
    `index` has ended."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def pump(i, job):
        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass
        for piece, upto in job.pieces_with_tokens():
            put((i, piece, upto))
        job.wait()
        put((i, None, None))

    for i, job in enumerate(jobs):
        threading.Thread(target=pump, args=(i, job), daemon=True, name="cfg-textgen-pump").start()
    left = len(jobs)
    while left:
        i, piece, upto = await queue.get()
        left -= piece is None
        yield i, piece, upto


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


async def started(jobs) -> APIError | None:
    """Wait until every job has left the queue; the 503 to answer if the server refused to start
    one because it is shutting down."""
    while not all(job.started or job.done for job in jobs):
        await asyncio.sleep(0.05)
    if any(job.stop_reason == SHUTDOWN for job in jobs):
        for job in jobs:
            job.cancel()
        return shutting_down()
    return None


class EventStream(StreamingResponse):
    """SSE that watches for the client's disconnect while streaming (Starlette only does that for
    old ASGI servers); the body generator is cancelled then, and its `finally` cancels the jobs.

    The status line waits for the body's first item: a queued stream that the server refuses to
    start (shutdown) is then still a plain 503 error in the API's shape, not a 200 stream."""

    media_type = "text/event-stream"

    def __init__(self, content, api: str = WEBUI):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.api = api

    async def stream_response(self, send):
        first = await anext(aiter(self.body_iterator), None)
        if isinstance(first, APIError):
            await self.body_iterator.aclose()
            refusal = _error_response(self.api, first)
            await send({"type": "http.response.start", "status": refusal.status_code, "headers": refusal.raw_headers})
            await send({"type": "http.response.body", "body": refusal.body, "more_body": False})
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if first:
            await send({"type": "http.response.body", "body": first.encode(self.charset), "more_body": True})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk.encode(self.charset), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def run(func):
                await func()
                tg.cancel_scope.cancel()

            tg.start_soon(run, partial(self.stream_response, send))
            await run(partial(self.listen_for_disconnect, receive))


def _ended(jobs) -> None:
    """A non-streaming request's jobs have ended: raise the 503 or 500 to answer instead, if any."""
    if any(job.stop_reason == SHUTDOWN for job in jobs):
        for job in jobs:
            job.cancel()  # n > 1: the choices that did start
        raise shutting_down()
    failed = next((j for j in jobs if j.stop_reason == "error"), None)
    if failed is not None:
        raise _error_of(failed)


def _error_of(job) -> APIError:
    return APIError(500, f"generation failed: {job.error}", None, "generation_error")


# ---- text-generation-webui API ----------------------------------------------------------------


def submit_choices(service, c, prompt, preset, opposing_ids=None, logprobs=None) -> list:
    """The `n` jobs of a web UI / OpenAI request (seeds seed, seed + 1, ...); none left running
    if one is refused."""
    jobs = []
    try:
        for i in range(c.n):
            jobs.append(submit(service, c.length_field, prompt, preset,
                               None if c.seed is None else (c.seed + i) % 2**64, ban_eos=c.ban_eos_token,
                               truncate=c.truncate, api=WEBUI, logprobs=logprobs,
                               opposing_ids=opposing_ids, cache_prompt=c.cache_prompt))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


async def answer(request: Request, jobs, stream: bool, whole, chunk, usage, opening=(), text_of=None,
                 offset: int = 0, shape=None):
    """The OpenAI-shaped answer for the jobs: `whole()` once all are done, or server-sent events:
    `opening` chunks, `chunk(i, text, reason, token_logprobs)` per piece and per choice's end (the
    last one with `usage()`), then [DONE]. With `text_of` (a token's text), each chunk carries the
    log-probs of the tokens its text came from: `shape(entries, offset)`, by default completions'
    object (logprobs.openai), whose text offsets count from `offset`. A client that leaves cancels
    the jobs."""
    shape = shape or (lambda entries, at: logprobs.openai(entries, text_of, at))

    async def events():
        # per choice: tokens whose log-probs were sent, and where the next token's text starts
        sent, offsets = [0] * len(jobs), [offset] * len(jobs)

        def token_logprobs(i: int, upto: int | None) -> dict | None:
            if text_of is None:
                return None
            entries = logprobs.shown(jobs[i], upto)[sent[i]:]
            out = shape(entries, offsets[i])
            sent[i] += len(entries)
            offsets[i] += sum(len(text_of(e.token)) for e in entries)
            return out

        for event in opening:
            yield _sse(event)
        ended = 0
        async for i, piece, upto in pieces_of(jobs):
            if piece is not None:
                yield _sse(chunk(i, piece, None, token_logprobs(i, upto)))
                continue
            ended += 1
            job = jobs[i]
            if job.stop_reason == "error":
                yield _sse(error_body(WEBUI, _error_of(job)))
                continue
            last = chunk(i, "", job.finish_reason, token_logprobs(i, None))
            if ended == len(jobs):
                last["usage"] = usage()
            yield _sse(last)
        yield "data: [DONE]\n\n"

    return await respond(request, jobs, stream, whole, events, WEBUI)


async def respond(request: Request, jobs, stream: bool, whole, events, api: str):
    """Every generate route's answer, in its API's shape: `whole()` as JSON once all jobs are done,
    or the server-sent `events()` (strings) once they have started. A refusal to start (shutdown)
    is a plain error response, a failed non-streamed job a 500, and a client that leaves cancels
    the jobs (streaming or not)."""
    if not stream:
        if not await wait_or_cancel(request, jobs):
            return JSONResponse({})  # the client is gone; nobody reads this
        _ended(jobs)
        return JSONResponse(whole())

    async def body():
        try:
            refused = await started(jobs)
            if refused is not None:
                yield refused
                return
            yield ""  # the status line: the jobs run
            async for event in events():
                yield event
        finally:
            for job in jobs:
                job.cancel()  # a no-op for a finished job; frees the slot of a dropped client

    return EventStream(body(), api)


def _start_completion(request: Request, body: dict):
    """Parse, tokenize and queue a completion's n jobs (in a worker thread)."""
    service = request.app.state.service
    c, preset = webui.parse_completion(body, service)
    request.state.skipped_samplers = c.skipped_samplers
    jobs = submit_choices(service, c, c.prompt, preset, logprobs=c.logprobs)
    try:
        echo = (c.prompt if isinstance(c.prompt, str) else service.detokenize(c.prompt)) if c.echo else ""
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return c, jobs, _used(request, jobs), echo


async def completions(request: Request):
    service = request.app.state.service
    c, jobs, prompt_tokens, echo = await off_loop(_start_completion, request, await read_json(request))
    cid, model = webui.new_id(), service.model_name
    text_of = service.token_text if c.logprobs is not None else None
    return await answer(request, jobs, c.stream,
                        whole=lambda: webui.completion_response(cid, model, jobs, prompt_tokens, echo, text_of),
                        chunk=lambda i, text, reason, lp: webui.chunk(cid, model, i, text, reason, lp),
                        usage=lambda: webui.usage(jobs, prompt_tokens),
                        opening=[webui.chunk(cid, model, i, echo) for i in range(len(jobs))] if echo else [],
                        text_of=text_of, offset=len(echo))


def _start_chat(request: Request, body: dict):
    """Parse, render, tokenize and queue a chat's n jobs (in a worker thread)."""
    service = request.app.state.service
    c, preset, prompt, opposing = chat.parse_chat(body, service)
    request.state.skipped_samplers = c.skipped_samplers
    jobs = submit_choices(service, c, prompt, preset, opposing, logprobs=c.alternatives)
    return c, jobs, _used(request, jobs)


async def chat_completions(request: Request):
    service = request.app.state.service
    c, jobs, prompt_tokens = await off_loop(_start_chat, request, await read_json(request))
    cid, model = chat.new_id(), service.model_name
    shape = None
    if c.alternatives is not None:
        shape = lambda entries, at=0: logprobs.chat(entries, service.token_text, service.token_bytes)  # noqa: E731
    return await answer(request, jobs, c.stream,
                        whole=lambda: chat.chat_response(cid, model, jobs, prompt_tokens, shape),
                        chunk=lambda i, text, reason, lp: chat.chat_chunk(cid, model, i, {"content": text} if text
                                                                          else {}, reason, lp),
                        usage=lambda: webui.usage(jobs, prompt_tokens),
                        opening=[chat.chat_chunk(cid, model, i, {"role": "assistant", "content": ""})
                                 for i in range(len(jobs))],
                        text_of=service.token_text if shape else None, shape=shape)


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
    text = read(webui.TextBody, await read_json(request)).text
    tokens = await off_loop(service.tokenize, text)
    return JSONResponse({"tokens": tokens, "length": len(tokens)})


async def decode(request: Request):
    service = request.app.state.service
    tokens = read(webui.TokensBody, await read_json(request), vocab_size=service.vocab_size).tokens
    return JSONResponse({"text": await off_loop(service.detokenize, tokens)})


async def token_count(request: Request):
    service = request.app.state.service
    text = read(webui.TextBody, await read_json(request)).text
    return JSONResponse({"length": len(await off_loop(service.tokenize, text))})


async def stop_generation(request: Request):
    # the web UI's stop button: the generations running now end (with what they have); waiting
    # ones still run, as in the web UI, whose every generation clears the stop flag when it starts
    request.app.state.service.stop_running(WEBUI)
    return JSONResponse("OK")


# ---- KoboldAI API (KoboldCpp) -----------------------------------------------------------------


def _kobold_job(request: Request, body: dict):
    """Parse, tokenize and queue a Kobold generation (in a worker thread)."""
    service = request.app.state.service
    g, preset = kobold.parse_generate(body, service)
    request.state.skipped_samplers = g.skipped_samplers
    job = submit(service, "max_length", g.prompt, preset, g.sampler_seed,
                 ban_eos=g.bans_eos, truncate=g.truncate, api=KOBOLD, genkey=g.genkey,
                 logprobs=logprobs.KOBOLD_TOP if g.logprobs else None)
    return job, _used(request, [job])


async def kobold_generate(request: Request):
    job, prompt_tokens = await off_loop(_kobold_job, request, await read_json(request))
    return await respond(request, [job], False,
                         lambda: kobold.generate_response(job, prompt_tokens, request.app.state.service), None,
                         KOBOLD)


async def kobold_stream(request: Request):
    job, _ = await off_loop(_kobold_job, request, await read_json(request))

    async def events():
        async for _, piece, _ in pieces_of([job]):
            if piece is not None:
                yield _kobold_event({"token": piece, "finish_reason": None})
            elif job.stop_reason == "error":
                yield _kobold_event(error_body(KOBOLD, _error_of(job)))
            else:
                yield _kobold_event({"token": "", "finish_reason": job.finish_reason})

    return await respond(request, [job], True, None, events, KOBOLD)


def _kobold_event(data: dict) -> str:
    return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def kobold_abort(request: Request):
    # an empty body (KoboldCpp's clients send none, or `{}`) is a keyless abort
    genkey = read(kobold.AbortBody, await read_json(request, empty={})).genkey
    n = request.app.state.service.abort(genkey or None)
    return JSONResponse({"success": "true" if n else "false", "done": "true"})


async def kobold_tokencount(request: Request):
    service = request.app.state.service
    ids = await off_loop(service.tokenize, read(kobold.TokenCountBody, await read_json(request)).prompt)
    return JSONResponse({"value": len(ids), "ids": ids})


async def kobold_perf(request: Request):
    return JSONResponse(kobold.perf_response(request.app.state.service))


async def _genkey(request: Request) -> str | None:
    """The `genkey` of a poll: KoboldCpp takes it from a JSON body (POST); GET has none."""
    if request.method == "GET":
        return None
    return read(kobold.AbortBody, await read_json(request, empty={})).genkey  # chunked bodies too


async def kobold_check(request: Request):
    # poll mode: the text so far of the generation named by genkey (kept after it ends or aborts)
    job = request.app.state.service.kobold_job(await _genkey(request))
    return JSONResponse({"results": [{"text": job.text if job is not None else ""}]})


async def kobold_last_logprobs(request: Request):
    service = request.app.state.service
    job = service.kobold_job(await _genkey(request))
    return JSONResponse({"logprobs": kobold.logprobs_of(job, service) if job is not None and job.done else None})


async def kobold_preloadstory(request: Request):
    return JSONResponse({})  # KoboldCpp without --preloadstory: no story to hand out


async def sd_models(request: Request):
    return JSONResponse([])  # KoboldCpp without an image model: Lite hides image generation


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


def _error_response(api: str, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(api, err), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: APIError):
    return _error_response(api_of_path(request.url.path), err)


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
               request_log=None, loopback: bool = False, body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """The app; `request_log` (a callable taking a line, e.g. printing to stderr) logs every request;
    `body_timeout`: seconds a request's body may take (reading.py);
    `loopback`: the server is bound to a loopback address (without an API key it then answers only
    loopback Host names: see origin.py)."""
    routes = [
        Route("/v1/models", models), Route("/v1/models/{model:path}", model_detail),
        Route("/v1/internal/model/info", model_info), Route("/v1/internal/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
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
        Route("/api/extra/generate/check", kobold_check, methods=["GET", "POST"]),
        Route("/api/extra/last_logprobs", kobold_last_logprobs, methods=["GET", "POST"]),
        Route("/api/extra/preloadstory", kobold_preloadstory), Route("/sdapi/v1/sd-models", sd_models),
    ]
    from .llamacpp_routes import ROUTES as LLAMACPP_AND_TABBY  # they use this module's helpers

    routes += LLAMACPP_AND_TABBY
    middleware = [Middleware(LocalOnly, cors_origins=cors_origins, check_host=loopback and not api_key,
                             check_origin=not api_key)]
    # LocalOnly first (it lets preflights through); CORS before the key check, so that a
    # browser's preflight (which carries no key) is answered
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=[SKIPPED_HEADER]))
    middleware.append(Middleware(RequestLog, log=request_log))  # outside the key check: 401s are logged too
    middleware.append(Middleware(APIKey, key=api_key))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _crash})
    app.state.service = service
    app.state.api_key = api_key
    app.state.body_timeout = body_timeout
    return app
