"""What today's apps rely on, through `cfg-textgen serve` as a real process on a tiny random model:
Kobold `memory` in front of the prompt and kept whole by the cut (KoboldCpp's rule), the prompt
tokens actually used in `usage` / `prompt_tokens`, unknown sampler-order entries skipped and named
in the `X-Skipped-Samplers` header, and the one-line request log on stderr (`--quiet`: none).

"Memory in front" is checked by its effect: a greedy Kobold request with memory M and prompt P
writes the same text as a greedy web UI request whose prompt is the token ids M + P (P without its
BOS; after a cut, M + the most recent tokens of P) and reports that many prompt tokens.
"""

from __future__ import annotations

import re

import httpx
import pytest

from server_process import ServerProcess

MEMORY = "[The story is set on a remote island in the North Atlantic.]\n"
PROMPT = "The lighthouse keeper had not seen a ship in eleven years. On the morning the fog lifted,"
GREEDY_KOBOLD = {"temperature": 0, "rep_pen": 1, "max_length": 6}
GREEDY_WEBUI = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = ServerProcess("--model", str(tiny_model_dir))
    yield srv
    assert srv.terminate() == 0, srv.stderr()


def post(srv, path, body):
    r = httpx.post(srv.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def encode(srv, text) -> list[int]:
    return post(srv, "/v1/internal/encode", {"text": text}).json()["tokens"]


def story_without_bos(srv, story: list[int]) -> list[int]:
    """The story's ids without its BOS (KoboldCpp: "remove bos token from prompt, it'll be taken
    from memory"); the BOS is what the tokenizer gives an empty text, if anything."""
    bos = encode(srv, "")
    return story[len(bos):] if bos and story[:len(bos)] == bos else story


def webui_greedy(srv, ids) -> dict:
    return post(srv, "/v1/completions", {"prompt": ids, **GREEDY_WEBUI}).json()


def test_server_kobold_memory_goes_in_front_of_the_prompt(server):
    memory, story = encode(server, MEMORY), encode(server, PROMPT)
    got = post(server, "/api/v1/generate", {"prompt": PROMPT, "memory": MEMORY, **GREEDY_KOBOLD}).json()
    ids = memory + story_without_bos(server, story)
    expected = webui_greedy(server, ids)
    assert got["results"][0]["text"] == expected["choices"][0]["text"]
    assert got["results"][0]["prompt_tokens"] == len(ids) == expected["usage"]["prompt_tokens"]
    without = post(server, "/api/v1/generate", {"prompt": PROMPT, "memory": "", **GREEDY_KOBOLD}).json()
    assert without["results"][0]["prompt_tokens"] == len(story)


def test_server_kobold_cut_keeps_memory_whole_and_the_most_recent_story(server):
    memory, story = encode(server, MEMORY), encode(server, PROMPT)
    window = len(memory) + 5 + GREEDY_KOBOLD["max_length"]  # room for 5 story tokens
    got = post(server, "/api/v1/generate", {"prompt": PROMPT, "memory": MEMORY, "max_context_length": window,
                                            **GREEDY_KOBOLD}).json()
    expected = webui_greedy(server, memory + story[-5:])
    assert got["results"][0]["text"] == expected["choices"][0]["text"]
    assert got["results"][0]["prompt_tokens"] == len(memory) + 5


def test_server_usage_counts_the_prompt_tokens_used_after_a_cut(server):
    story = encode(server, PROMPT)
    r = post(server, "/v1/completions", {"prompt": PROMPT, "truncation_length": 12, **GREEDY_WEBUI}).json()
    assert len(story) > 12 and r["usage"]["prompt_tokens"] == 12 - GREEDY_WEBUI["max_tokens"]
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]


def test_server_unknown_sampler_entries_are_skipped_and_named_in_a_header_and_the_log(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "top_k": 20,
            "sampler_priority": ["top_k", "banana_sampler", "temperature", "adaptive_p"]}
    r = post(server, "/v1/completions", body)
    assert r.headers["x-skipped-samplers"] == "banana_sampler"
    usage = r.json()["usage"]
    k = post(server, "/api/v1/generate", {"prompt": PROMPT, "max_length": 3, "sampler_order": [6, 0, 1, 9, 3, 4, 2, 5]})
    assert k.headers["x-skipped-samplers"] == "9"
    assert "x-skipped-samplers" not in post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}).headers
    server.wait_log(f"POST /v1/completions 200 prompt={usage['prompt_tokens']} new={usage['completion_tokens']} "
                    r"cached=0 \d+\.\d\ds skipped=banana_sampler")  # transformers: no prompt cache
    server.wait_log(r"POST /api/v1/generate 200 prompt=\d+ new=\d+ cached=0 \d+\.\d\ds skipped=9")
    server.wait_log(r"GET /v1/models 200 \d+\.\d\ds\n")


def test_server_skipped_sampler_names_with_control_characters_are_escaped_not_a_lost_answer(server):
    # the names are the client's own strings; a raw control character is an illegal header value,
    # and the server then closed the connection without an answer (found by sending odd values)
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 2, "samplers": "\x00"})
    assert r.status_code == 200 and r.headers["x-skipped-samplers"] == "\\x00"
    names = ["top_k", "caf\u00e9\r\nSet-Cookie: a=b", "x" * 100] + [f"s{i}" for i in range(20)]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "sampler_priority": names})
    assert r.status_code == 200 and "set-cookie" not in r.headers
    shown = r.headers["x-skipped-samplers"].split(", ")
    assert shown[0] == "caf\\xe9\\r\\nSet-Cookie: a=b" and shown[1] == "x" * 61 + "..."
    assert shown[2:] == [f"s{i}" for i in range(14)] + ["(+6 more)"]
    server.wait_log(r"POST /completion 200 .* skipped=\\x00\n")


def test_server_request_log_counts_a_streams_tokens_and_quiet_turns_it_off(tiny_model_dir):
    srv = ServerProcess("--model", str(tiny_model_dir), "--quiet")
    try:
        with httpx.stream("POST", srv.url + "/api/extra/generate/stream", json={"prompt": PROMPT, "max_length": 4},
                          timeout=120) as r:
            assert r.status_code == 200
            r.read()
        assert "/api/extra/generate/stream" not in srv.stderr() and "GET /v1/models" not in srv.stderr()
    finally:
        assert srv.terminate() == 0, srv.stderr()


def test_server_request_log_counts_a_streams_new_tokens(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True,
                                                                      "ban_eos_token": True}, timeout=120) as r:
        assert r.status_code == 200
        r.read()
    server.wait_log(r"POST /v1/completions 200 prompt=\d+ new=4 cached=\d+ \d+\.\d\ds")


def run_logged(app, scope_path="/x", breaks_off=False):
    """Runs `app` behind RequestLog as an ASGI server would; returns the events in order: the
    response messages' kinds and the log lines (`breaks_off`: the app raises "the client left")."""
    import asyncio

    from cfg_textgen.server.requestlog import RequestLog

    events, requested = [], [False]

    async def receive():  # the body once, then nothing until the response ends (the client stays)
        if requested[0]:
            await asyncio.Event().wait()
        requested[0] = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        events.append(("last body" if message["type"] == "http.response.body" and not message.get("more_body")
                       else message["type"]))

    scope = {"type": "http", "method": "POST", "path": scope_path, "headers": [], "query_string": b""}
    middleware = RequestLog(app, log=lambda line: events.append(("log", line)))
    if breaks_off:
        with pytest.raises(RuntimeError, match="the client left"):
            asyncio.run(middleware(scope, receive, send))
    else:
        asyncio.run(middleware(scope, receive, send))
    return events


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_request_log_line_is_written_before_the_last_bytes_of_the_answer(streamed):
    # a client that has read its whole answer finds its line logged (tests and writers reading the
    # log after a reply rely on it); the token counts are read then, when the job has ended
    from starlette.responses import PlainTextResponse, StreamingResponse

    class Job:
        token_ids, cached_rows = [], [0]

    async def app(scope, receive, send):
        scope["state"]["jobs"] = [job := Job()]

        async def chunks():
            for t in range(3):
                job.token_ids.append(t)
                yield f"data: {t}\n\n"
        if streamed:
            await StreamingResponse(chunks(), media_type="text/event-stream")(scope, receive, send)
        else:
            job.token_ids.extend([0, 1, 2])
            await PlainTextResponse("whole")(scope, receive, send)

    events = run_logged(app)
    assert events[-2][0] == "log" and events[-1] == "last body", events
    assert re.fullmatch(r"POST /x 200 prompt=0 new=3 cached=0 \d+\.\d\ds", events[-2][1])
    assert sum(e[0] == "log" for e in events) == 1


def test_request_log_line_of_an_answer_that_broke_off_is_written_once_when_it_ends():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("the client left")

    events = run_logged(app, breaks_off=True)
    assert [e for e in events if e[0] == "log"] == [("log", events[-1][1])]
    assert re.fullmatch(r"POST /x 200 \d+\.\d\ds", events[-1][1])


def test_server_logs_each_cut_of_an_opposing_prompt_as_a_warning_line(server):
    # the tiny model's window is 256 tokens; the warning comes from the generation code, and
    # Python would print it once per source line with a file:line heading
    body = {"prompt": PROMPT, "max_tokens": 2, "guidance_scale": 1.5, "negative_prompt": "a dull story. " * 200}
    for _ in range(2):
        post(server, "/v1/completions", body)
    line = r"warning: the opposing prompt is \d+ tokens; only its last \d+ fit the context and were used\n"
    server.wait_log(r"(?s)(%s.*){2}" % line)
    assert "UserWarning" not in server.stderr()
