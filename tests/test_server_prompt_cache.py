"""The prompt cache behind `cfg-textgen serve` (a real process, the default model, deterministic
mode): a writer's second turn (the story + what was generated + a new paragraph) reads only the new
tokens and gives, token for token under greedy, what the same request gives read cold
(`cache_prompt: false`, llama.cpp's field); a word changed in the middle is read again from there;
the request log and llama.cpp's `timings.cache_n` show what the cache held."""

from __future__ import annotations

import re

import httpx
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


def logged_cached(srv, count: int) -> list[int]:
    """The `cached=N` of the first `count` /completion log lines."""
    srv.wait_log(r"(?s)(POST /completion 200 .*){%d}" % count)
    return [int(n) for n in re.findall(r"POST /completion 200 prompt=\d+ new=\d+ cached=(\d+)", srv.stderr())]


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
    before = len(logged_cached(server, 0))
    complete(server, "A quiet harbour town. " * 8)
    again = complete(server, "A quiet harbour town. " * 8)
    complete(server, "A quiet harbour town. " * 8, cache_prompt=False)
    cached = logged_cached(server, before + 3)[before:]
    assert cached[1] == again["timings"]["cache_n"] == again["tokens_evaluated"] - 1
    assert cached[2] == 0
