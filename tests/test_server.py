"""`cfg-textgen serve` on the real default model, driven by real clients (the `openai` package,
httpx) over a real local port: streamed == non-streamed, the same greedy text through the web UI
API, the KoboldAI API and `cfg-textgen generate`, CFG exactly as the CLI does it (a SillyTavern-
style negative prompt as long as the story included), and a load of concurrent streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_process import REPO, ServerProcess

pytestmark = pytest.mark.slow

STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, "
         "lit the lamp, and")
# SillyTavern builds its negative prompt as a whole second prompt: the same story, another preamble
ST_POSITIVE = "[Genre: gothic horror; Tone: dread, slow, precise.]\n" + STORY
ST_NEGATIVE = "[Genre: cheerful children's tale; Tone: light, silly.]\n" + STORY
TOKENS = 8


@pytest.fixture(scope="module")
def server():
    # the engine picks the backend (llama.cpp for the default GGUF when installed);
    # CFG_TEXTGEN_TEST_BACKEND=transformers runs this module on the other one
    backend = os.environ.get("CFG_TEXTGEN_TEST_BACKEND")
    srv = ServerProcess(*(["--backend", backend] if backend else []))
    yield srv
    assert srv.terminate() == 0, srv.stderr()


def _cli_backend_flags(srv) -> list[str]:
    """Run the CLI on the server's backend (llama.cpp and transformers round differently)."""
    loader = httpx.get(srv.url + "/v1/internal/model/info").json()["loader"]
    help_text = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", "generate", "--help"], cwd=REPO,
                               capture_output=True, text=True).stdout
    if "--backend" not in help_text:
        assert loader == "Transformers", "the CLI has no --backend: it cannot run on the server's llama.cpp"
        return []
    return ["--backend", "llama.cpp" if loader == "llama.cpp" else "transformers"]


def cli_generate(srv, prompt: str, *flags: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", "generate", prompt, "--preset", "greedy",
                          "--tokens", str(TOKENS), *_cli_backend_flags(srv), *flags], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def webui(srv, body: dict) -> dict:
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_openai_client_streamed_equals_non_streamed(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed")
    model = client.models.list().data[0].id
    for sampling in ({"temperature": 0.9, "seed": 7},):  # greedy: the other tests
        extra = {"guidance_scale": 1.5, "negative_prompt": "A dull, generic story."}
        done = client.completions.create(model=model, prompt=STORY, max_tokens=TOKENS, extra_body=extra,
                                         **sampling)
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == TOKENS
        pieces = [c.choices[0].text for c in client.completions.create(
            model=model, prompt=STORY, max_tokens=TOKENS, extra_body=extra, stream=True, **sampling) if c.choices]
        assert len(pieces) > 2 and "".join(pieces) == done.choices[0].text


def test_server_same_greedy_text_through_webui_kobold_and_cli(server):
    expected = cli_generate(server, STORY)
    assert webui(server, {"prompt": STORY, "max_tokens": TOKENS, "temperature": 0})["choices"][0]["text"] == expected
    kobold = {"prompt": STORY, "max_length": TOKENS, "temperature": 0}
    r = httpx.post(server.url + "/api/v1/generate", json=kobold, timeout=600).json()
    assert r["results"][0]["text"] == expected
    events = httpx.post(server.url + "/api/extra/generate/stream", json=kobold, timeout=600).text
    tokens = [json.loads(line[6:])["token"] for line in events.splitlines() if line.startswith("data: ")]
    assert "".join(tokens) == expected


def test_server_cfg_fields_equal_cli_cfg_flags(server, tmp_path):
    plain = cli_generate(server, ST_POSITIVE)
    for scale, negative in ((3.0, ST_NEGATIVE),):
        opposing = tmp_path / "negative.txt"
        opposing.write_text(negative, encoding="utf-8")
        expected = cli_generate(server, ST_POSITIVE, "--cfg-scale", str(scale), "--opposing-file", str(opposing))
        body = {"prompt": ST_POSITIVE, "max_tokens": TOKENS, "temperature": 0, "guidance_scale": scale,
                "negative_prompt": negative}
        assert webui(server, body)["choices"][0]["text"] == expected
        # SillyTavern's KoboldCpp type posts KoboldCpp's names to /v1/completions
        kcpp = {"prompt": ST_POSITIVE, "max_tokens": TOKENS, "temperature": 0, "rep_pen": 1, "api_type": "koboldcpp",
                "sampler_order": [6, 0, 1, 3, 4, 2, 5], "guidance_scale": scale, "negative_prompt": negative}
        assert webui(server, kcpp)["choices"][0]["text"] == expected
    assert expected != plain  # the long negative prompt changes the text: the test can fail


def _stream(srv, body) -> str:
    text = ""
    with httpx.stream("POST", srv.url + "/v1/completions", json=body | {"stream": True}, timeout=900) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
    return text


def test_server_load_8_clients_x_5_streams_each_equal_to_alone(server):
    # short, so that the serial fallback (one request at a time) stays quick; distinct prompts
    bodies = [{"prompt": f"Chapter {j + 1}. The keeper", "max_tokens": 3, "temperature": 0, "guidance_scale": 1.5}
              for j in range(5)]
    alone = [webui(server, b)["choices"][0]["text"] for b in bodies]

    def client(_):
        return [_stream(server, b) for b in bodies]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert results == [alone] * 8


def _idle_soon(srv, seconds: float = 60) -> bool:
    """KoboldCpp's /api/extra/perf says `idle` once no job runs; a job left running with thousands
    of tokens to go would keep it busy for many minutes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(srv.url + "/api/extra/perf").json()["idle"] == 1:
            return True
        time.sleep(0.2)
    return False


def test_server_dropped_stream_frees_its_slot(server):
    body = {"prompt": STORY, "max_tokens": 4000, "temperature": 1.0, "seed": 1, "ban_eos_token": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response (a disconnect)
        next(line for line in lines if line.startswith("data: "))
        assert httpx.get(server.url + "/api/extra/perf").json()["idle"] == 0
    assert _idle_soon(server)
    done = webui(server, {"prompt": STORY, "max_tokens": 2, "temperature": 0})
    assert done["usage"]["completion_tokens"] == 2


def test_server_non_streaming_client_that_leaves_is_cancelled(server):
    for path, body in (("/v1/completions", {"prompt": STORY, "max_tokens": 4000, "temperature": 1.0, "seed": 2,
                                            "ban_eos_token": True}),
                       ("/api/v1/generate", {"prompt": STORY, "max_length": 4000, "bypass_eos": True})):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + path, json=body, timeout=3)
        assert _idle_soon(server)


def test_server_readme_openai_examples_run_against_the_server(server, capsys):
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```py\n(.*?)```", readme, flags=re.S) if "extra_body" in b]
    assert len(blocks) == 2  # completions, chat completions
    for block in blocks:
        exec(compile(block.replace("http://127.0.0.1:5000", server.url), "README openai example", "exec"), {})
        assert capsys.readouterr().out.strip()


def test_server_stop_generation_and_abort_end_a_running_job(server):
    for path, body, stop in (
            ("/v1/completions", {"prompt": STORY, "max_tokens": 4000, "temperature": 1.0, "seed": 1,
                                 "ban_eos_token": True}, ("/v1/internal/stop-generation", {})),
            ("/api/v1/generate", {"prompt": STORY, "max_length": 4000, "bypass_eos": True, "genkey": "KCPPab12"},
             ("/api/extra/abort", {"genkey": "KCPPab12"}))):
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=httpx.post(server.url + path, json=body, timeout=600)))
        worker.start()
        while httpx.get(server.url + "/api/extra/perf").json()["idle"] == 1:  # until the job runs
            time.sleep(0.1)
        assert httpx.post(server.url + stop[0], json=stop[1]).status_code == 200
        worker.join(120)
        data = out["r"].json()
        if path == "/v1/completions":
            assert data["choices"][0]["finish_reason"] == "stop" and data["usage"]["completion_tokens"] < 4000
        else:
            assert data["results"][0]["finish_reason"] == "stop" and data["results"][0]["completion_tokens"] < 4000
        assert _idle_soon(server)
