"""The routes of llama.cpp server's own API and TabbyAPI's status and token routes (shapes:
llamacpp.py), over the same Service, jobs and streaming helpers as the other two APIs (app.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import llamacpp
from .app import _error_of, _sse, _used, off_loop, pieces_of, read_json, respond, submit
from .bodies import read
from .errors import WEBUI, error_body


def _start_completion(request: Request, body: dict):
    """Parse, tokenize and queue a llama.cpp-style completion (in a worker thread)."""
    service = request.app.state.service
    c, preset, max_new = llamacpp.parse_completion(body, service)
    request.state.skipped_samplers = c.skipped_samplers
    job = submit(service, c.length_field, c.prompt, preset, c.seed, ban_eos=c.ignore_eos, api=WEBUI,
                 logprobs=c.n_probs if c.n_probs else None, cache_prompt=c.cache_prompt)
    return c, preset, max_new, job, _used(request, [job])


async def completion(request: Request):
    service = request.app.state.service
    c, preset, max_new, job, prompt_n = await off_loop(_start_completion, request, await read_json(request))

    async def events():
        sent = 0  # tokens already sent
        async for _, piece, upto in pieces_of([job]):
            if piece is None:
                if job.stop_reason == "error":
                    yield _sse(error_body(WEBUI, _error_of(job)))
                else:
                    yield _sse(llamacpp.final(job, c, preset, max_new, prompt_n, service, streamed=True))
                break
            probs = llamacpp.probabilities(job, c, service, upto, sent) if c.n_probs else None
            yield _sse(llamacpp.partial(job, c, piece, job.token_ids[sent:upto], upto, prompt_n, probs))
            sent = upto

    return await respond(request, [job], c.stream,
                         lambda: llamacpp.final(job, c, preset, max_new, prompt_n, service, streamed=False),
                         events, WEBUI)


async def tokenize(request: Request):
    service = request.app.state.service
    t = read(llamacpp.TokenizeBody, await read_json(request))
    ids = await off_loop(service.tokenize, t.content, special=t.add_special)
    if t.with_pieces:
        return JSONResponse({"tokens": [{"id": i, "piece": service.token_text(i)} for i in ids]})
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request):
    service = request.app.state.service
    tokens = read(llamacpp.DetokenizeBody, await read_json(request), vocab_size=service.vocab_size).tokens
    return JSONResponse({"content": await off_loop(service.detokenize, tokens)})


async def props(request: Request):
    return JSONResponse(llamacpp.props_response(request.app.state.service))


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def tabby_model_list(request: Request):
    return JSONResponse({"object": "list", "data": [llamacpp.tabby_model_card(request.app.state.service)]})


async def tabby_model(request: Request):
    return JSONResponse(llamacpp.tabby_model_card(request.app.state.service))


async def tabby_encode(request: Request):
    service = request.app.state.service
    t = read(llamacpp.TabbyEncodeBody, await read_json(request))
    ids = await off_loop(service.tokenize, t.text, special=t.add_bos_token)
    return JSONResponse({"tokens": ids, "length": len(ids)})


async def tabby_decode(request: Request):
    service = request.app.state.service
    tokens = read(llamacpp.TabbyDecodeBody, await read_json(request), vocab_size=service.vocab_size).tokens
    return JSONResponse({"text": await off_loop(service.detokenize, tokens)})


ROUTES = [
    Route("/completion", completion, methods=["POST"]), Route("/completions", completion, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
    Route("/props", props), Route("/health", health), Route("/v1/health", health),
    Route("/v1/model/list", tabby_model_list), Route("/v1/model", tabby_model),
    Route("/v1/token/encode", tabby_encode, methods=["POST"]),
    Route("/v1/token/decode", tabby_decode, methods=["POST"]),
]
