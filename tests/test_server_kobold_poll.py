"""Kobold Lite's poll mode and status routes against `cfg-textgen serve` (a real process, tiny model),
answered as KoboldCpp's koboldcpp.py answers them: /api/extra/generate/check (the text so far for
a genkey, the partial text after an abort), /api/extra/preloadstory ({}), /sdapi/v1/sd-models ([])
and /api/extra/perf (its fields; `queue` counts requests waiting, not running)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from server_process import serving

PROMPT = "Once upon a time there was a little fox"
LONG = {"prompt": PROMPT, "max_length": 240, "temperature": 1.0, "top_k": 0, "top_p": 1, "min_p": 0,
        "rep_pen": 1, "ban_eos_token": True}
PERF_FIELDS = {"last_process", "last_eval", "last_token_count", "last_seed", "total_gens", "stop_reason",
               "queue", "idle", "uptime", "idletime"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving("--model", str(tiny_model_dir), "--parallel", "4") as srv:
        yield srv


def post(srv, path, body=None):
    return httpx.post(srv.url + path, json=body, timeout=120)


def in_thread(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    thread.start()
    return thread, out


def test_kobold_poll_connect_routes_answer_as_koboldcpp_without_story_or_images(server):
    assert httpx.get(server.url + "/api/extra/preloadstory").json() == {}
    assert httpx.get(server.url + "/sdapi/v1/sd-models").json() == []


def test_kobold_poll_check_gives_the_text_so_far_and_the_partial_text_after_abort(server):
    thread, out = in_thread(post, server, "/api/v1/generate", {**LONG, "genkey": "KCPP-poll", "sampler_seed": 4})
    seen = ""
    while not seen and thread.is_alive():
        seen = post(server, "/api/extra/generate/check", {"genkey": "KCPP-poll"}).json()["results"][0]["text"]
    assert post(server, "/api/extra/abort", {"genkey": "KCPP-poll"}).json()["success"] == "true"
    thread.join()
    result = out["r"].json()["results"][0]
    assert result["completion_tokens"] < 240  # the abort ended it early
    assert result["text"].startswith(seen)
    # Lite keeps what the check returns after an abort: the same partial text
    after = post(server, "/api/extra/generate/check", {"genkey": "KCPP-poll"}).json()
    assert after == {"results": [{"text": result["text"]}]}
    # another user's key (or none, while a keyed job was the last) never sees this text
    assert post(server, "/api/extra/generate/check", {"genkey": "KCPP-other"}).json() == {"results": [{"text": ""}]}
    assert post(server, "/api/extra/generate/check").json() == {"results": [{"text": ""}]}


def start_streams(srv, n: int):
    """n long Kobold streams in threads; each sets its event once its first token has arrived
    (from then on it is running, not waiting)."""
    started = [threading.Event() for _ in range(n)]

    def run(i):
        with httpx.stream("POST", srv.url + "/api/extra/generate/stream", json={**LONG, "max_length": 100, "sampler_seed": i},
                          timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, started


def wait_for(events, count: int) -> None:
    deadline = time.monotonic() + 120
    while sum(e.is_set() for e in events) < count:
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.01)


def test_kobold_perf_queue_counts_waiting_requests_not_running_ones(server):
    # --parallel 4: four run at once; KoboldCpp's queue counts requests not yet started
    threads, started = start_streams(server, 4)
    wait_for(started, 4)
    perf = httpx.get(server.url + "/api/extra/perf").json()
    assert perf["idle"] == 0 and perf["queue"] == 0  # the old answer, running - 1, said 3
    for t in threads:
        t.join()

    threads, started = start_streams(server, 6)
    wait_for(started, 4)
    assert httpx.get(server.url + "/api/extra/perf").json()["queue"] == 2  # the fifth and sixth wait
    for t in threads:
        t.join()
    perf = httpx.get(server.url + "/api/extra/perf").json()
    assert PERF_FIELDS <= set(perf)
    assert perf["idle"] == 1 and perf["queue"] == 0 and perf["uptime"] > 0
    assert perf["last_token_count"] == 100 and perf["stop_reason"] == 0  # KoboldCpp: 0 = out of tokens
    assert perf["last_seed"] in range(6) and perf["last_process"] >= 0 and perf["last_eval"] > 0


def test_kobold_poll_abort_returns_the_text_held_back_for_a_possible_stop_sequence(server):
    # KoboldCpp's generate returns all the text made before an abort. Here the stop sequence is
    # the run's own text from its 20th character on plus a character it never writes, so from there
    # every character may still be the start of it and is held back from the check route; an abort
    # must still give it out (it was never a stop sequence)
    seeded = {**LONG, "sampler_seed": 6}
    whole = post(server, "/api/v1/generate", seeded).json()["results"][0]["text"]
    body = {**seeded, "genkey": "KCPP-held", "stop_sequence": [whole[20:] + "\u2603"]}
    thread, out = in_thread(post, server, "/api/v1/generate", body)
    seen = ""
    while len(seen) < 20 and thread.is_alive():  # on a busy machine a check may come before 20 characters
        seen = post(server, "/api/extra/generate/check", {"genkey": "KCPP-held"}).json()["results"][0]["text"]
        assert whole[:20].startswith(seen)  # never more than the text before the held-back part
    assert seen == whole[:20]
    assert post(server, "/api/extra/abort", {"genkey": "KCPP-held"}).json()["success"] == "true"
    thread.join()
    result = out["r"].json()["results"][0]
    assert result["finish_reason"] == "cancelled" and result["completion_tokens"] < 240
    # the text of exactly the tokens made before the abort: the same seeded run cut at that length
    made = post(server, "/api/v1/generate", {**seeded, "max_length": result["completion_tokens"]}).json()
    assert result["text"] == made["results"][0]["text"] and len(result["text"]) > 20
    assert post(server, "/api/extra/generate/check", {"genkey": "KCPP-held"}).json()["results"][0]["text"] \
        == result["text"]
