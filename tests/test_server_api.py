"""`cfg-textgen serve` as a real process on a tiny random model (fast): every route's documented
shape, a table of bad requests (status, error shape, the named field), the API key, CORS, the body
limit and SIGTERM. Generation *quality* is not the point here; the real model is in test_server.py.

Shapes are those of text-generation-webui's modules/api (script.py, typing.py, completions.py) and
KoboldCpp's koboldcpp.py; error shapes: web UI {"error": {"message", "type", "param", "code"}},
KoboldCpp {"detail": {"msg", "type"}} (we add "field").
"""

from __future__ import annotations

import json

import httpx
import pytest

from server_process import ServerProcess

PROMPT = "Once upon a time there was a little fox"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = ServerProcess("--model", str(tiny_model_dir))
    yield srv
    assert srv.terminate() == 0, srv.stderr()


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    # the key comes from the environment variable; CORS allows one origin
    srv = ServerProcess("--model", str(tiny_model_dir), "--cors-origin", "http://lite.example",
                        env={"CFG_TEXTGEN_API_KEY": "sekrit"}, key="sekrit")
    yield srv
    assert srv.terminate() == 0, srv.stderr()


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# ---- shapes -----------------------------------------------------------------------------------


def test_server_webui_routes_have_the_web_ui_shapes(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    name = models["data"][0]["id"]
    assert httpx.get(f"{server.url}/v1/models/{name}").json()["id"] == name
    info = httpx.get(server.url + "/v1/internal/model/info").json()
    assert info["model_name"] == name and info["lora_names"] == [] and "loader" in info
    enc = post(server, "/v1/internal/encode", {"text": PROMPT}).json()
    assert enc["length"] == len(enc["tokens"]) > 0 and all(isinstance(t, int) for t in enc["tokens"])
    assert PROMPT in post(server, "/v1/internal/decode", {"tokens": enc["tokens"]}).json()["text"]
    assert post(server, "/v1/internal/token-count", {"text": PROMPT}).json() == {"length": enc["length"]}
    assert post(server, "/v1/internal/stop-generation", {}).json() == "OK"

    done = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}).json()
    assert done["object"] == "text_completion" and done["model"] == name and done["id"].startswith("cmpl-")
    (choice,) = done["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert done["usage"]["prompt_tokens"] == enc["length"]
    assert done["usage"]["total_tokens"] == enc["length"] + done["usage"]["completion_tokens"]

    streamed = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_data(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["choices"][0]["index"] == 0 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def test_server_n_choices_use_seed_plus_index_and_stream_with_their_index(server):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 3}
    done = post(server, "/v1/completions", body).json()
    assert [c["index"] for c in done["choices"]] == [0, 1, 2]
    alone = [post(server, "/v1/completions", body | {"n": 1, "seed": 11 + i}).json()["choices"][0]["text"]
             for i in range(3)]
    assert [c["text"] for c in done["choices"]] == alone
    events = [json.loads(e) for e in sse_data(post(server, "/v1/completions", body | {"stream": True}).text)[:-1]]
    texts = ["", "", ""]
    for e in events:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == alone


def test_server_kobold_routes_have_the_koboldcpp_shapes(server):
    get = lambda path: httpx.get(server.url + path).json()  # noqa: E731
    assert get("/api/v1/model")["result"].startswith("koboldcpp/")
    assert get("/api/v1/info/version") == {"result": "1.2.5"}
    version = get("/api/extra/version")
    assert version["result"] == "KoboldCpp" and isinstance(version["version"], str) and version["protected"] is False
    assert get("/api/v1/config/max_context_length") == {"value": 256}  # the tiny model's window
    assert isinstance(get("/api/v1/config/max_length")["value"], int)
    perf = get("/api/extra/perf")
    assert perf["idle"] == 1 and perf["queue"] == 0 and isinstance(perf["total_gens"], int)
    count = post(server, "/api/extra/tokencount", {"prompt": PROMPT}).json()
    assert count["value"] == len(count["ids"]) > 0

    body = {"prompt": PROMPT, "max_length": 5, "temperature": 0}
    (result,) = post(server, "/api/v1/generate", body).json()["results"]
    assert set(result) >= {"text", "finish_reason"} and result["completion_tokens"] <= 5
    streamed = post(server, "/api/extra/generate/stream", body)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in streamed.text.splitlines() if line]
    assert lines[0::2] == ["event: message"] * (len(lines) // 2)
    events = [json.loads(x) for x in sse_data(streamed.text)]
    assert events[-1] == {"token": "", "finish_reason": result["finish_reason"]}
    assert "".join(e["token"] for e in events) == result["text"]
    assert post(server, "/api/extra/abort", {"genkey": "KCPP0000"}).json()["done"] == "true"


# ---- bad requests -----------------------------------------------------------------------------

W, K = "/v1/completions", "/api/v1/generate"
OK = {"prompt": PROMPT, "max_tokens": 2}
KOK = {"prompt": PROMPT, "max_length": 2}
BAD = [  # (path, body: dict or raw text, status, field, words in the message)
    (W, '{"prompt": "x",', 400, None, "not valid JSON"),
    (W, "[1, 2]", 400, None, "JSON object"),
    (W, {"max_tokens": 2}, 400, "prompt", "required"),
    (W, {"prompt": 5}, 400, "prompt", "string"),
    (W, {"prompt": ["a", "b"]}, 400, "prompt", "batch"),
    (W, OK | {"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    (W, OK | {"max_tokens": -1}, 400, "max_tokens", ">= 1"),
    (W, OK | {"max_tokens": 100000}, 400, "max_tokens", "context window"),
    (W, OK | {"temperature": "hot"}, 400, "temperature", "number"),
    (W, '{"prompt": "x", "top_p": NaN}', 400, "top_p", "finite"),
    (W, OK | {"top_p": 1.5}, 400, "top_p", "[0, 1]"),
    (W, OK | {"top_k": -3}, 400, "top_k", ">= 0"),
    (W, OK | {"min_p": -0.5}, 400, "min_p", "-0.5"),
    (W, OK | {"sampler_priority": ["top_k", "top_k"]}, 400, "sampler_priority[1]", "listed twice"),
    (W, OK | {"preset": "no-such-preset"}, 400, "preset", "no-such-preset"),
    (W, OK | {"n": 0}, 400, "n", ">= 1"),
    (W, OK | {"stop": 5}, 400, "stop", "string"),
    (W, OK | {"guidance_scale": "big"}, 400, "guidance_scale", "number"),
    (W, OK | {"guidance_scale": 1.5, "negative_prompt": 7}, 400, "negative_prompt", "string"),
    (W, OK | {"prompt": "fox " * 400, "truncate": False}, 400, "prompt", "context"),
    (W, OK | {"mirostat_mode": 3}, 400, "mirostat_mode", "0, 1 or 2"),
    (W, OK | {"repetition_penalty": 1.2, "repetition_penalty_range": 1.5}, 400, "repetition_penalty_range", "whole"),
    (W, OK | {"dry_multiplier": 0.8, "dry_sequence_breakers": 5}, 400, "dry_sequence_breakers", "list"),
    (W, OK | {"seed": "x"}, 400, "seed", "integer"),
    (W, OK | {"ban_eos_token": "yes"}, 400, "ban_eos_token", "true or false"),
    (W, OK | {"sampler_order": [6, 0, 6], "api_type": "koboldcpp"}, 400, "sampler_order[2]", "listed twice"),
    (W, OK | {"adaptive_target": "x"}, 400, "adaptive_target", "number"),
    (W, OK | {"adaptive_target": 0.5, "adaptive_decay": -1}, 400, "adaptive_decay", "[0, 0.99]"),
    (W, OK | {"smoothing_factor": 0.5, "smoothing_curve": "x"}, 400, "smoothing_curve", "number"),
    ("/v1/internal/encode", {"txt": "x"}, 400, "text", "required"),
    ("/v1/internal/decode", {"tokens": [-1]}, 400, "tokens", "vocabulary"),
    ("/v1/internal/decode", {"tokens": "1,2"}, 400, "tokens", "list"),
    ("/v1/nothing-here", {}, 404, None, "no such route"),
    (K, {"max_length": 2}, 400, "prompt", "required"),
    (K, KOK | {"max_length": 0}, 400, "max_length", ">= 1"),
    (K, KOK | {"rep_pen": "x"}, 400, "rep_pen", "number"),
    (K, KOK | {"sampler_order": [0, 0]}, 400, "sampler_order[1]", "listed twice"),
    (K, KOK | {"memory": 5}, 400, "memory", "string"),
    (K, KOK | {"use_default_badwordsids": "yes"}, 400, "use_default_badwordsids", "true or false"),
    (K, KOK | {"adaptive_target": 0.5, "adaptive_decay": "x"}, 400, "adaptive_decay", "number"),
    (K, '{"prompt": "x", "temperature": Infinity}', 400, "temperature", "finite"),
    (K, KOK | {"guidance_scale": "x"}, 400, "guidance_scale", "number"),
    (K, KOK | {"stop_sequence": [1]}, 400, "stop_sequence", "string"),
    ("/api/extra/tokencount", {"prompt": 5}, 400, "prompt", "string"),
]


@pytest.mark.parametrize("path,body,status,field,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_server_bad_request_is_a_4xx_naming_the_field(server, path, body, status, field, words):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    if path.startswith("/api/"):
        detail = r.json()["detail"]
        assert detail["type"] == "bad_input" and detail.get("field") == field
        message = detail["msg"]
    else:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field and error["code"] is None
        message = error["message"]
    assert words in message
    if field:
        assert field.split("[")[0] in message


# The request bodies are pydantic models (server/bodies.py) in strict mode: pydantic's lax mode
# would take "2" or true for an integer and 1 for true, which no client means. An integral float
# is an integer (JSON does not tell them apart); the OpenAI fields' nulls mean "not given", other
# fields' nulls are refused. (path, body, field or None when the request is fine, words)
STRICT = [
    (W, OK | {"max_tokens": "2"}, "max_tokens", "must be an integer"),
    (W, OK | {"max_tokens": True}, "max_tokens", "must be an integer"),
    (W, OK | {"n": 1.5}, "n", "must be an integer"),
    (W, OK | {"n": 9}, "n", "<= 8"),
    (W, OK | {"stream": "true"}, "stream", "true or false"),
    (W, OK | {"echo": 1}, "echo", "true or false"),
    (W, {"prompt": PROMPT, "max_new_tokens": None}, "max_new_tokens", "must not be null"),
    (W, OK | {"truncation_length": -1}, "truncation_length", ">= 0"),
    (W, OK | {"preset": 5}, "preset", "must be a string"),
    (W, OK | {"prompt": [1, True]}, "prompt", "token ids"),
    (W, OK | {"prompt": []}, "prompt", "token ids"),
    (W, OK | {"stopping_strings": ["\n", 2]}, "stopping_strings", "list of strings"),
    (K, KOK | {"max_length": "2"}, "max_length", "must be an integer"),
    (K, KOK | {"max_length": None}, "max_length", "must not be null"),
    (K, KOK | {"sampler_seed": True}, "sampler_seed", "must be an integer"),
    (K, KOK | {"trim_stop": "yes"}, "trim_stop", "true or false"),
    (K, KOK | {"genkey": 5}, "genkey", "must be a string"),
    (K, KOK | {"prompt": [1, 2]}, "prompt", "must be a string"),
    (K, KOK | {"prompt": ["a", "b"]}, "prompt", "batch of 2 prompts"),
    ("/v1/internal/encode", {"text": ["x"]}, "text", "must be a string"),
    ("/v1/internal/token-count", {"text": None}, "text", "required"),  # before: "must be a string"
    ("/api/extra/abort", {"genkey": 5}, "genkey", "must be a string"),
    (W, OK | {"max_tokens": 2.0}, None, ""),
    (W, OK | {"max_tokens": None, "max_new_tokens": 2, "n": None, "seed": None, "stop": None}, None, ""),
    (W, OK | {"prompt": [PROMPT], "stop": ""}, None, ""),
    (W, OK | {"prompt": [1, 2, 3]}, None, ""),
    (K, KOK | {"prompt": [PROMPT], "sampler_seed": 7.0, "genkey": "KCPP7"}, None, ""),
    ("/api/extra/abort", {"genkey": None}, None, ""),
]


@pytest.mark.parametrize("path,body,field,words", STRICT, ids=[f"{i}-{b[2]}" for i, b in enumerate(STRICT)])
def test_server_request_fields_are_strict_as_before_pydantic(server, path, body, field, words):
    r = post(server, path, body | ({"temperature": 0} if path in (W, K) else {}))
    if field is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    if path.startswith("/api/"):
        detail = r.json()["detail"]
        assert detail["type"] == "bad_input" and detail["field"] == field
        message = detail["msg"]
    else:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field
        message = error["message"]
    assert f"`{field}`" in message and words in message


def test_server_prompt_token_ids_outside_the_vocabulary_are_a_400(server):
    # the web UI takes a prompt as token ids; an id the model does not have was a 500 from the
    # generation ("index out of range"), now a 400 naming `prompt`, as /decode does for `tokens`
    r = post(server, W, {"prompt": [5, 10 ** 6], "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and "`prompt` must hold ids in [0, " in error["message"]
    assert "vocabulary" in error["message"]
    assert post(server, W, {"prompt": [5, 6], "max_tokens": 2, "temperature": 0}).status_code == 200


def test_server_seed_beyond_64_bits_is_a_400_naming_the_seed(server):
    # torch's generators take 64-bit seeds; a larger one was a 400 naming `prompt` ("Overflow when
    # unpacking long long"); the n choices' seeds (seed + index) wrap at 2**64
    for path, body, field in ((W, OK | {"seed": 2**64}, "seed"), (K, KOK | {"sampler_seed": 2**70}, "sampler_seed")):
        r = post(server, path, body)
        assert r.status_code == 400, r.text
        found = r.json()["detail"]["field"] if path == K else r.json()["error"]["param"]
        assert found == field
    assert post(server, W, OK | {"seed": 2**64 - 1, "n": 2}).status_code == 200


def test_server_still_answers_after_the_bad_requests(server):
    for path, body, *_ in BAD:  # all of them again, back to back
        httpx.post(server.url + path, content=body if isinstance(body, str) else json.dumps(body), timeout=60)
    assert httpx.get(server.url + "/v1/models").status_code == 200
    assert post(server, W, OK | {"temperature": 0}).json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_server_unknown_keys_are_ignored(server):
    # SillyTavern forwards its own keys and other backends' names for the same settings
    extra = {"api_type": "ooba", "api_server": "http://127.0.0.1:5000", "rep_pen": 1.1, "tfs_z": 1,
             "repeat_last_n": 64, "n_predict": 2, "bypass_status_check": False, "custom_token_bans": "",
             "banned_strings": [], "mirostat": 0, "ignore_eos": False, "grammar_string": ""}
    base = post(server, W, OK | {"temperature": 0}).json()["choices"][0]["text"]
    assert post(server, W, OK | {"temperature": 0} | extra).json()["choices"][0]["text"] == base


def test_server_negative_prompt_longer_than_the_window_is_cut_like_the_story(server):
    # SillyTavern's negative prompt is a whole second prompt: as long as the story, or longer than
    # the window; the engine cuts the opposing row on its own, as it cuts the story
    long = "Once upon a time there was a little fox. " * 60  # > 256 tokens of the tiny model
    r = post(server, W, {"prompt": long, "max_tokens": 3, "temperature": 0, "guidance_scale": 1.5,
                         "negative_prompt": "The knight rode through the rain. " * 60})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_server_max_tokens_at_the_window_is_refused_not_a_crash(server):
    r = post(server, W, {"prompt": PROMPT, "max_tokens": 255, "temperature": 0})
    assert r.status_code in (200, 400), r.text  # fits (story cut to 1 token) or refused, never a 500
    r = post(server, K, {"prompt": PROMPT, "max_length": 256})
    assert r.status_code == 400 and r.json()["detail"]["field"] == "max_length"


# ---- body limit, API key, CORS ----------------------------------------------------------------


def test_server_body_over_10_mb_is_413_in_each_api_shape(server):
    big = json.dumps({"prompt": "x" * (10 * 1024 * 1024 + 10)})
    r = httpx.post(server.url + W, content=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + K, content=big, timeout=60)
    assert r.status_code == 413 and r.json()["detail"]["type"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(11):
            yield b"x" * (1024 * 1024)
    r = httpx.post(server.url + W, content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/v1/models").status_code == 200


def test_server_without_cors_origin_sends_no_cors_headers(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_server_api_key_is_required_on_every_route(keyed):
    routes = [("GET", "/v1/models"), ("GET", "/v1/internal/model/info"), ("POST", "/v1/completions"),
              ("POST", "/v1/internal/encode"), ("POST", "/v1/internal/stop-generation"),
              ("GET", "/api/v1/model"), ("GET", "/api/extra/version"), ("POST", "/api/v1/generate"),
              ("POST", "/api/extra/generate/stream"), ("POST", "/api/extra/abort"), ("GET", "/nowhere")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "sekrit"}):
            r = httpx.request(method, keyed.url + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (method, path, headers)
            if path.startswith("/api/"):
                assert r.json()["detail"]["type"] == "unauthorized"
            else:
                assert r.json()["error"]["code"] == "invalid_api_key"
    for headers in ({"Authorization": "Bearer sekrit"}, {"x-api-key": "sekrit"}):
        assert httpx.get(keyed.url + "/v1/models", headers=headers).status_code == 200
        r = httpx.post(keyed.url + "/api/v1/generate", headers=headers, json=KOK | {"temperature": 0}, timeout=60)
        assert r.status_code == 200 and "results" in r.json()
    assert httpx.get(keyed.url + "/api/extra/version", headers={"x-api-key": "sekrit"}).json()["protected"] is True


def test_server_cors_allows_only_the_named_origin(keyed):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(keyed.url + "/api/v1/generate", headers=pre | {"Origin": "http://lite.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://lite.example"
    other = httpx.options(keyed.url + "/api/v1/generate", headers=pre | {"Origin": "http://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"
    r = httpx.get(keyed.url + "/v1/models", headers={"Origin": "http://lite.example", "x-api-key": "sekrit"})
    assert r.headers["access-control-allow-origin"] == "http://lite.example"


# ---- process: SIGTERM, binding ----------------------------------------------------------------


def test_server_sigterm_finishes_the_running_stream_and_exits_0(tiny_model_dir):
    srv = ServerProcess("--model", str(tiny_model_dir), "--host", "0.0.0.0")
    try:
        assert "without an API key" in srv.stderr()  # a non-loopback bind without a key warns
        body = {"prompt": PROMPT, "max_tokens": 120, "temperature": 1.0, "seed": 3, "ban_eos_token": True,
                "stream": True}
        with httpx.stream("POST", srv.url + W, json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            srv.proc.send_signal(15)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the running generation was finished, not cut
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/v1/models", timeout=5)
    finally:
        srv.terminate()
