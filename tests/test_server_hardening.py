"""`cfg-textgen serve` against hostile and unlucky clients, as real processes on loopback ports:
one user's abort or stop ends only what it should; a long tokenization does not stall other
routes; idle and slowloris connections are closed and never lock real clients out; web pages
without a listed origin (CSRF) or under another name (DNS rebinding) are refused while the
recorded SillyTavern and Kobold Lite traffic passes; a full queue and a shutdown answer 503;
every stream ends with its last event. (Bad request bodies: the table in test_server_api.py.)

Long generations run on a random 8-layer model with a 4,096-token window (`slow_model_dir`):
slow enough on a CPU that a test can act while they run; every one is ended by the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_process import REPO, ServerProcess

TRAFFIC = Path("/work/shared/client-traffic")
LITE = "https://lite.koboldai.net"
LONG_W = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 1.0, "ban_eos_token": True}
LONG_K = {"prompt": "Once upon a time", "max_length": 3000, "temperature": 1.0, "bypass_eos": True}


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import torch

    path = tmp_path_factory.mktemp("slow-llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, vocab_size=400, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _low_file_limit():
    """The common default soft limit (1,024 open files), so that an idle flood could exhaust it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


@pytest.fixture(scope="module")
def web(tiny_model_dir):
    srv = ServerProcess("--model", str(tiny_model_dir), "--cors-origin", LITE, "--header-timeout", "3", "--body-timeout", "3",
                        "--max-connections", "1000", preexec=_low_file_limit)
    yield srv
    assert srv.terminate() == 0, srv.stderr()
    assert "Traceback" not in srv.stderr()


@pytest.fixture(scope="module")
def slow(slow_model_dir):
    srv = ServerProcess("--model", str(slow_model_dir), "--parallel", "2", "--max-queue", "1")
    yield srv
    assert srv.terminate() == 0, srv.stderr()
    assert "Traceback" not in srv.stderr()


class Stream:
    """A streamed generation read in a thread: its status, its `data:` events; `close()` hangs up
    (which cancels the job)."""

    def __init__(self, srv, path: str, body: dict, stream: bool = True):
        self.status, self.error, self.events, self.ended_at = None, None, [], None
        self._hang_up = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._read, args=(srv.url + path, body | ({"stream": True} if stream else {})),
                         daemon=True).start()

    def _read(self, url, body):
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                self.status, self.headers = r.status_code, r.headers
                if r.status_code != 200:
                    self.error = json.loads(r.read())
                    return
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                    if self._hang_up.is_set():
                        return
        finally:
            self.ended_at = time.monotonic()
            self.done.set()

    def close(self):
        self._hang_up.set()
        assert self.done.wait(60)

    def text_events(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    def wait_for_tokens(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.events and not self.done.is_set():
            assert time.monotonic() < deadline, "the generation never produced a token"
            time.sleep(0.05)


def wait_perf(srv, timeout: float = 60, **expected) -> None:
    """Until KoboldCpp's /api/extra/perf says `expected` (`queue`: requests waiting; `idle`: 1 when
    nothing runs or waits)."""
    deadline = time.monotonic() + timeout
    while True:
        perf = httpx.get(srv.url + "/api/extra/perf", timeout=10).json()
        if all(perf[k] == v for k, v in expected.items()):
            return
        assert time.monotonic() < deadline, f"perf is {perf}, expected {expected}"
        time.sleep(0.05)


def still_running(stream: Stream, timeout: float = 60) -> bool:
    """The stream keeps producing tokens (it was not cancelled)."""
    seen, deadline = len(stream.events), time.monotonic() + timeout
    while len(stream.events) == seen and not stream.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(stream.events) > seen and not stream.events[-1].endswith('"cancelled"}')


def answers(srv) -> bool:
    return httpx.get(srv.url + "/v1/models", timeout=1).status_code == 200


# ---- 1. abort and stop: one user ends only its own generation ------------------------------


def test_server_abort_with_a_chunked_genkey_stops_only_that_job_and_keyless_needs_one_job(slow):
    a = Stream(slow, "/api/extra/generate/stream", LONG_K | {"genkey": "KCPPaaaa"})
    b = Stream(slow, "/api/extra/generate/stream", LONG_K | {"genkey": "KCPPbbbb"})
    a.wait_for_tokens(), b.wait_for_tokens()
    # keyless, two users running: KoboldCpp cannot tell whose job it is and ends none
    for raw in (b"", b"{}"):
        r = httpx.post(slow.url + "/api/extra/abort", content=raw, timeout=10)
        assert r.json()["success"] == "false"
    assert still_running(a) and still_running(b)

    def chunked():  # no Content-Length: the body must still be read
        yield b'{"genkey": '
        yield b'"KCPPaaaa"}'
    r = httpx.post(slow.url + "/api/extra/abort", content=chunked(), timeout=10)
    assert r.status_code == 200 and r.json()["success"] == "true"
    assert a.done.wait(30)
    assert json.loads(a.events[-1]) == {"token": "", "finish_reason": "cancelled"}
    assert still_running(b)

    # keyless with one job on the server: that one ends, as in KoboldCpp
    assert httpx.post(slow.url + "/api/extra/abort", timeout=10).json()["success"] == "true"
    assert b.done.wait(30)
    assert json.loads(b.events[-1])["finish_reason"] == "cancelled"
    wait_perf(slow, idle=1)
    assert answers(slow)


def test_server_stop_generation_ends_running_jobs_not_waiting_ones(slow):
    # two run (--parallel 2), one waits; the web UI clears its stop flag when a generation
    # starts, so the waiting one runs after the stop
    running = [Stream(slow, "/v1/completions", LONG_W | {"seed": i}) for i in range(2)]
    for s in running:
        s.wait_for_tokens()
    waiting = Stream(slow, "/v1/completions", LONG_W | {"seed": 9})
    wait_perf(slow, queue=1)
    assert httpx.post(slow.url + "/v1/internal/stop-generation", timeout=10).json() == "OK"
    for s in running:
        assert s.done.wait(30)
        assert s.events[-1] == "[DONE]"
        assert s.text_events()[-1]["choices"][0]["finish_reason"] == "cancelled"
    waiting.wait_for_tokens()
    first = waiting.text_events()[0]["choices"][0]
    assert waiting.status == 200 and first["finish_reason"] is None and first["text"]
    waiting.close()
    wait_perf(slow, idle=1)


def test_server_non_streaming_cancelled_request_says_cancelled(slow):
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        r=httpx.post(slow.url + "/api/v1/generate", json=LONG_K | {"genkey": "KCPPcccc"}, timeout=120)))
    worker.start()
    wait_perf(slow, idle=0, queue=0)
    time.sleep(0.5)  # let it run past its prefill
    assert httpx.post(slow.url + "/api/extra/abort", json={"genkey": "KCPPcccc"}, timeout=10).json()["success"] == "true"
    worker.join(60)
    assert out["r"].status_code == 200 and out["r"].json()["results"][0]["finish_reason"] == "cancelled"


# ---- 7. a bounded queue ----------------------------------------------------------------------


def test_server_full_queue_is_a_503_with_retry_after_in_each_api_shape(slow):
    jobs = [Stream(slow, "/v1/completions", LONG_W | {"seed": i}) for i in range(2)]
    for s in jobs:
        s.wait_for_tokens()
    jobs.append(Stream(slow, "/v1/completions", LONG_W | {"seed": 3}))  # waits: --max-queue 1
    wait_perf(slow, queue=1)
    r = httpx.post(slow.url + "/v1/completions", json=LONG_W, timeout=30)
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "service_unavailable" and "--max-queue" in r.json()["error"]["message"]
    r = httpx.post(slow.url + "/api/v1/generate", json=LONG_K, timeout=30)
    assert r.status_code == 503 and r.json()["detail"]["type"] == "service_unavailable"
    assert answers(slow)
    for s in jobs:
        s.close()
    wait_perf(slow, idle=1)


# ---- 2. tokenizing off the event loop -------------------------------------------------------


def test_server_long_tokenization_does_not_stall_other_routes(slow):
    text = "Once upon a time there was a little fox who lived in the forest. " * 40000  # 2.6 MB
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        r=httpx.post(slow.url + "/v1/internal/token-count", json={"text": text}, timeout=300)))
    worker.start()
    time.sleep(0.5)  # the upload (loopback) is done; the server tokenizes for seconds
    assert httpx.get(slow.url + "/v1/internal/health", timeout=10).status_code == 200
    assert "r" not in out, "health waited for the tokenizer"
    worker.join(300)
    assert out["r"].json()["length"] > 100000


# ---- 3. idle connections, slowloris ---------------------------------------------------------


def test_server_idle_flood_leaves_room_and_idle_sockets_are_closed(web):
    # the server started with 1,024 open files (soft); it raises that to the hard limit and
    # caps connections at 1,000 (--max-connections), closing the longest-idle beyond it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # this side's 1,100
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", web.port)))
        started = time.monotonic()
        r = httpx.post(web.url + "/v1/internal/token-count", json={"text": "hello"}, timeout=2)
        assert r.status_code == 200 and time.monotonic() - started < 2
        # every idle socket is closed by the server within the header timeout (3 s) + a sweep
        deadline = time.monotonic() + 3 + 5
        for s in idle:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in idle:
            s.close()
    assert answers(web)


def test_server_slowloris_headers_are_cut_at_the_header_timeout(web):
    conns = [socket.create_connection(("127.0.0.1", web.port)) for _ in range(20)]
    started = time.monotonic()
    closed = set()
    try:
        for c in conns:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            c.settimeout(0.05)
        while len(closed) < len(conns) and time.monotonic() - started < 10:
            for i, c in enumerate(conns):  # a header line now and then, never the end of headers
                if i in closed:
                    continue
                try:
                    c.sendall(b"X-a: b\r\n")
                    if c.recv(1) == b"":
                        closed.add(i)
                except (socket.timeout, TimeoutError):
                    pass
                except OSError:
                    closed.add(i)
        assert len(closed) == len(conns), f"{len(conns) - len(closed)} slow connections still open after 10 s"
    finally:
        for c in conns:
            c.close()
    assert answers(web)


# ---- 4. CSRF and DNS rebinding --------------------------------------------------------------


def test_server_refuses_other_hosts_and_unlisted_page_origins(web):
    body = {"prompt": "x", "max_tokens": 1}
    r = httpx.get(web.url + "/v1/models", headers={"Host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    r = httpx.post(web.url + "/api/v1/generate", json=body, headers={"Host": "attacker.example:5000"})
    assert r.status_code == 403 and r.json()["detail"]["type"] == "forbidden_host"
    # a cross-origin text/plain POST needs no preflight: refused whatever its Content-Type
    for path in ("/v1/completions", "/v1/internal/stop-generation", "/api/extra/abort"):
        r = httpx.post(web.url + path, content=json.dumps(body),
                       headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
        assert r.status_code == 403, (path, r.text)
    r = httpx.post(web.url + "/v1/completions", json=body, headers={"Origin": "null"})  # a file:// page
    assert r.status_code == 403 and "--cors-origin null" in r.json()["error"]["message"]
    for host in ("localhost", "127.0.0.1", "127.9.9.9:80", "[::1]:5000", "LOCALHOST:1", "app.localhost"):
        assert httpx.get(web.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    assert httpx.post(web.url + "/v1/completions", json=body, headers={"Origin": LITE}).status_code == 200


def _recorded(name: str):
    for line in (TRAFFIC / name).read_text(encoding="utf-8").splitlines():
        request = json.loads(line)
        body = request["body"]
        if isinstance(body, dict):  # short generations: the tiny model's window is 256 tokens
            body = body | {k: 2 for k in ("max_tokens", "max_length") if k in body}
        yield request["method"], request["path"], body


@pytest.mark.skipif(not TRAFFIC.is_dir(), reason="the recorded client traffic is not on this machine")
def test_server_recorded_sillytavern_and_kobold_lite_traffic_passes_the_origin_checks(web):
    def send(method, path, body, headers):
        r = httpx.request(method, web.url + path, json=body, timeout=120,
                          headers=headers | ({"Access-Control-Request-Method": "POST"} if method == "OPTIONS" else {}))
        return r.status_code

    checked = 0
    for name, origin in (("sillytavern-koboldcpp-stream.jsonl", None), ("sillytavern-ooba-stream-logprobs.jsonl", None),
                         ("sillytavern-ooba-chat-cfg.jsonl", None), ("kobold-lite-v180.jsonl", LITE)):
        for method, path, body in _recorded(name):
            if path == "/api/extra/abort":
                continue  # would end the other test's jobs; covered above
            page = {"Origin": origin} if origin else {}  # SillyTavern's server sends no Origin
            bare = send(method, path, body, {} if method != "OPTIONS" else {"Origin": LITE})
            assert bare != 403
            assert send(method, path, body, page) == bare, (name, method, path)
            if method == "POST":
                assert send(method, path, body, {"Origin": "https://evil.example"}) == 403, (name, path)
            checked += 1
    assert checked > 40


# ---- 6. shutdown ---------------------------------------------------------------------------


def test_server_sigterm_ends_every_stream_with_its_last_event_and_queued_get_503(slow_model_dir):
    srv = ServerProcess("--model", str(slow_model_dir), "--parallel", "2", "--max-queue", "4",
                        "--shutdown-grace", "1")
    try:
        webui = Stream(srv, "/v1/completions", LONG_W)
        kobold = Stream(srv, "/api/extra/generate/stream", LONG_K)
        webui.wait_for_tokens(), kobold.wait_for_tokens()
        queued = [Stream(srv, "/v1/completions", LONG_W), Stream(srv, "/api/v1/generate", LONG_K, stream=False)]
        wait_perf(srv, queue=2)
        srv.proc.send_signal(15)
        for q in queued:
            assert q.done.wait(30)
        assert [q.status for q in queued] == [503, 503]
        assert queued[0].error["error"]["code"] == "service_unavailable"
        assert queued[1].error["detail"]["type"] == "service_unavailable"
        for s in (webui, kobold):
            assert s.done.wait(60)
            assert s.ended_at > max(q.ended_at for q in queued)  # the queued were answered first
        assert webui.events[-1] == "[DONE]"
        assert webui.text_events()[-1]["choices"][0]["finish_reason"] == "cancelled"
        assert json.loads(kobold.events[-1]) == {"token": "", "finish_reason": "cancelled"}
        assert srv.proc.wait(60) == 0
    finally:
        srv.terminate()
    assert "Traceback" not in srv.stderr()


# ---- 7. the API key's characters -----------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_server_non_ascii_api_key_is_refused_at_start(how):
    key = "schlüssel"
    args, env = (["--api-key", key], {}) if how == "flag" else ([], {"CFG_TEXTGEN_API_KEY": key})
    out = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", "serve", "--port", "1", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert out.returncode == 2 and "--api-key" in out.stderr and "ASCII" in out.stderr


class _Transport:
    def __init__(self):
        self.closed = False

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


class _Cycle:
    def __init__(self, complete: bool):
        self.response_complete = complete


class _Conn:
    """What the guard reads of a uvicorn connection: its current request cycle and transport."""

    def __init__(self, cycle=None):
        self.cycle, self.transport = cycle, _Transport()


def test_connection_guard_closes_late_headers_and_the_longest_idle_beyond_the_cap():
    from cfg_textgen.server.connections import SETTLE, ConnectionGuard

    guard = ConnectionGuard(header_timeout=10, max_connections=3)
    old = [_Conn(), _Conn(_Cycle(complete=True))]  # no request yet; a kept-alive one after its response
    busy = _Conn(_Cycle(complete=False))  # a request being answered (a long stream)
    conns = set(old) | {busy}
    assert guard.sweep(conns, now=0.0) == 0
    new = [_Conn(), _Conn()]
    conns |= set(new)
    # 5 > 3: the two idle since t=0 go first; the new ones settle, the busy one is never closed
    assert guard.sweep(conns, now=SETTLE / 2) == 0
    assert guard.sweep(conns, now=1.0) == 2
    assert all(c.transport.closed for c in old) and not any(c.transport.closed for c in new + [busy])
    conns -= set(old)
    # headers still missing after the timeout: closed, however few connections there are
    assert guard.sweep(conns, now=1.0 + 10.5) == 2
    assert all(c.transport.closed for c in new) and not busy.transport.closed
    # a kept-alive connection's next request starts its wait again
    again = _Conn(_Cycle(complete=True))
    assert guard.sweep({again}, now=20.0) == 0
    again.cycle = _Cycle(complete=True)
    assert guard.sweep({again}, now=29.0) == 0  # 9 s after its first response: its wait starts anew
    assert guard.sweep({again}, now=38.0) == 0 and guard.sweep({again}, now=39.5) == 1


def test_server_stalled_or_trickled_body_gets_408_and_a_closed_connection(web):
    def send(head_and_part: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", web.port))
        s.sendall(head_and_part)
        return s

    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    stalled = send(head + b'Content-Length: 100\r\n\r\n{"prompt": "x"')
    trickled = send(head + b'Transfer-Encoding: chunked\r\n\r\n')
    try:
        assert answers(web)  # other clients are served meanwhile
        received, answered = {"stalled": b"", "trickled": b""}, {}
        deadline = time.monotonic() + 20  # the fixture's --body-timeout is 3 s
        while len(answered) < 2 and time.monotonic() < deadline:
            for name, s in (("stalled", stalled), ("trickled", trickled)):
                if name in answered:
                    continue
                if name == "trickled":
                    with contextlib.suppress(OSError):
                        s.sendall(b"1\r\n \r\n")  # one byte of body now and then: never the end
                s.settimeout(0.2)
                with contextlib.suppress(socket.timeout, TimeoutError):
                    while chunk := s.recv(65536):  # the answer, then the server's close
                        received[name] += chunk
                    answered[name] = received[name]
        assert set(answered) == {"stalled", "trickled"}, f"still open after 20 s: {answered}"
        for data in answered.values():
            assert data.startswith(b"HTTP/1.1 408 "), data
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    finally:
        stalled.close()
        trickled.close()
    assert answers(web)
