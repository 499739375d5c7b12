"""The prompt cache behind `cfg-textgen serve` (a real process, the default model, deterministic
mode): a writer's second turn (the story + what was generated + a new paragraph) reads only the new
tokens and gives, token for token under greedy, what the same request gives read cold
(`cache_prompt: false`, llama.cpp's field); a word changed in the middle is read again from there;
the request log and llama.cpp's `timings.cache_n` show what the cache held. `cache_prompt: false`
works on the OpenAI-compatible routes too, as on llama.cpp server's, streamed or not."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from server_process import serving

STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, "
         "lit the lamp and wrote one line in the log: nothing. ") * 3
NEGATIVE = "[Tone: cheerful, silly.]\n" + STORY


@pytest.fixture(scope="module")
def server():
    with serving("--deterministic", "--parallel", "2") as srv:
        yield srv


def complete(srv, prompt: str, **fields) -> dict:
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0, **fields}
    response = httpx.post(srv.url + "/completion", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def logged(srv, count: int, path: str = "/completion", prompt: int | None = None) -> list[tuple[int, int]]:
    """(prompt=N, the story's cached=N) of the first `count` log lines of `path` (of a prompt of
    `prompt` tokens only, if given)."""
    n = r"\d+" if prompt is None else str(prompt)
    line = r"POST %s 200 prompt=(%s) new=\d+ cached=(\d+)" % (re.escape(path), n)
    srv.wait_log(r"(?s)(%s.*){%d}" % (line, count))
    return [(int(prompt), int(cached)) for prompt, cached in re.findall(line, srv.stderr())]


@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 1.5, "negative_prompt": NEGATIVE}], ids=["plain", "cfg"])
def test_server_prompt_cache_turn_two_equals_a_cold_read_token_for_token(server, cfg):
    first = complete(server, STORY, **cfg)
    turn2 = STORY + first["content"] + "\n\nThe next morning, a sail appeared."
    warm = complete(server, turn2, **cfg)
    cold = complete(server, turn2, cache_prompt=False, **cfg)
    # llama.cpp's fields: timings.cache_n the prompt tokens reused, prompt_n those read
    assert cold["timings"]["cache_n"] == 0 and cold["timings"]["prompt_n"] == cold["tokens_evaluated"]
    # the story's cache covers the first turn's prompt at least
    assert warm["timings"]["cache_n"] >= first["tokens_evaluated"] - 4
    assert warm["timings"]["prompt_n"] == warm["tokens_evaluated"] - warm["timings"]["cache_n"]
    assert warm["tokens_cached"] == warm["tokens_evaluated"] + warm["tokens_predicted"]
    assert warm["content"] == cold["content"] and warm["content"]
    if cfg:  # the log names each row's cached tokens: the story's + the negative prompt's
        found = server.wait_log(r"POST /completion 200 prompt=%d new=\d+ cached=(\d+)\+(\d+) "
                                % warm["tokens_evaluated"])
        assert int(found.group(1)) == warm["timings"]["cache_n"] and int(found.group(2)) > 0


def test_server_prompt_cache_rereads_a_changed_word_from_there(server):
    complete(server, STORY)
    changed = STORY[:len(STORY) * 3 // 4] + " storm" + STORY[len(STORY) * 3 // 4:]
    warm = complete(server, changed)
    cold = complete(server, changed, cache_prompt=False)
    assert 0 < warm["timings"]["cache_n"] < warm["tokens_evaluated"] * 4 // 5
    assert warm["content"] == cold["content"]


def test_server_request_log_says_how_many_prompt_tokens_were_cached(server):
    complete(server, "A quiet harbour town. " * 8)
    again = complete(server, "A quiet harbour town. " * 8)
    complete(server, "A quiet harbour town. " * 8, cache_prompt=False)
    # this prompt's lines only, the last three (the other tests' lines come between)
    lines = logged(server, 3, prompt=again["tokens_evaluated"])
    cached = [c for _, c in lines[-3:]]
    assert cached[1] == again["timings"]["cache_n"] == again["tokens_evaluated"] - 1
    assert cached[2] == 0


def ask_openai(srv, route: str, prompt: str, stream: bool, **extra) -> None:
    """One greedy request of a few tokens through the openai package (`extra`: fields it does not know)."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="not-needed")
    common = {"model": "default", "max_tokens": 3, "temperature": 0, "stream": stream, "extra_body": extra}
    if route == "/v1/completions":
        answer = client.completions.create(prompt=prompt, **common)
    else:
        answer = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    if stream:
        list(answer)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_server_prompt_cache_off_per_request_on_the_openai_routes(server, route, stream):
    prompt = f"{route} {stream}: the harbour town woke slowly under a grey sky. " * 3
    before = len(logged(server, 0, route))
    ask_openai(server, route, prompt, stream)
    ask_openai(server, route, prompt, stream, cache_prompt=False)
    ask_openai(server, route, prompt, stream)
    first, off, default = logged(server, before + 3, route)[before:]
    assert off == (first[0], 0)  # the same prompt, read whole
    # on by default: all of it but the last token (its logits are the request's) came from the cache
    assert default == (first[0], first[0] - 1)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_server_prompt_cache_flag_that_is_not_a_boolean_is_a_400_naming_it(server, route):
    body = {"prompt": "Hello", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
            "cache_prompt": "false"}
    response = httpx.post(server.url + route, json=body, timeout=60)
    assert response.status_code == 400
    assert "`cache_prompt` must be true or false" in response.text
