"""Server-side defaults (`serve --preset NAME|FILE --cfg-scale X --opposing TEXT`) through both APIs
and the openai client, on real server processes (tiny model). Precedence, field by field: request
field > server default > built-in default.

Each case is checked by equivalence: the request to a server with defaults gives the same seeded
tokens and the same per-token distributions (logprobs) as a request to a plain server that spells
the expected settings out. Equal distributions at every step cannot come from different settings.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server_process import serving

PROMPT = "Once upon a time there was a little fox"
NEGATIVE_PRESET = ("The text is dull, repetitive and vague. It keeps saying the same thing again and "
                   "again.")  # presets/negative-prompt.json's opposing prompt
FILE_PRESET = {"format": "cfg-textgen-preset/1", "name": "server-file",
               "cfg": {"scale": 2.0, "opposing_prompt": "A boring list."},
               "samplers": [{"sampler": "temperature", "temperature": 0.9}, {"sampler": "top_k", "k": 10}]}
# FILE_PRESET's samplers as web UI fields (its default order runs temperature, then top_k)
FILE_SAMPLERS = {"temperature": 0.9, "top_k": 10}
ENVELOPE = {"prompt": PROMPT, "max_tokens": 6, "seed": 7, "logprobs": 10}  # KoboldCpp gives 10 too


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    with serving("--model", str(tiny_model_dir), "--parallel", "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def by_name(tiny_model_dir):
    with serving("--model", str(tiny_model_dir), "--parallel", "2", "--preset", "negative-prompt") as srv:
        yield srv
        assert "defaults for requests that do not set them: preset 'negative-prompt'" in srv.stderr()


@pytest.fixture(scope="module")
def file_and_flags(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "server.json"
    path.write_text(json.dumps(FILE_PRESET))
    with serving("--model", str(tiny_model_dir), "--parallel", "2", "--preset", str(path),
                 "--cfg-scale", "2.5", "--opposing", "A dull story.") as srv:
        yield srv


def webui(srv, **fields) -> dict:
    response = httpx.post(srv.url + "/v1/completions", json={**ENVELOPE, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


def kobold(srv, **fields) -> dict:
    body = {"prompt": PROMPT, "max_length": 6, "sampler_seed": 7, "logprobs": True, **fields}
    response = httpx.post(srv.url + "/api/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    lp = result["logprobs"]
    # KoboldCpp's object holds OpenAI's completions lists; compare those
    return {"text": result["text"], "logprobs": {k: lp[k] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset", "story_logprobs")}}


def test_server_defaults_preset_by_name_gives_cfg_and_samplers_to_requests_without_them(by_name, plain):
    assert webui(by_name) == webui(plain, preset="negative-prompt")
    assert kobold(by_name) == webui(plain, preset="negative-prompt")


def test_server_defaults_request_fields_win_one_by_one(by_name, plain):
    # the request's scale wins; the server's opposing prompt still applies
    assert webui(by_name, guidance_scale=2) == webui(plain, preset="negative-prompt", guidance_scale=2,
                                                      negative_prompt=NEGATIVE_PRESET)
    # a request naming any sampler field gets its own samplers (web UI defaults), the server's CFG
    assert webui(by_name, temperature=0.5) == webui(plain, temperature=0.5, guidance_scale=1.5,
                                                     negative_prompt=NEGATIVE_PRESET)
    assert kobold(by_name, guidance_scale=1) == webui(plain, preset="negative-prompt", guidance_scale=1)


def test_server_defaults_flags_win_over_the_preset_file(file_and_flags, plain):
    expected = webui(plain, **FILE_SAMPLERS, guidance_scale=2.5, negative_prompt="A dull story.")
    assert webui(file_and_flags) == expected
    assert kobold(file_and_flags) == expected
    assert webui(file_and_flags, negative_prompt="Z") == webui(plain, **FILE_SAMPLERS, guidance_scale=2.5,
                                                               negative_prompt="Z")
    # without the defaults the same request is plain generation: they did change something
    assert webui(plain) != expected


def test_server_defaults_reach_the_openai_client(by_name, plain):
    import openai

    client = openai.OpenAI(base_url=by_name.url + "/v1", api_key="unused")
    done = client.completions.create(model="x", prompt=PROMPT, max_tokens=6, seed=7, logprobs=5)
    expected = webui(plain, preset="negative-prompt")
    assert done.choices[0].text == expected["text"]
    assert done.choices[0].logprobs.token_logprobs == expected["logprobs"]["token_logprobs"]
    # the client's own temperature is a sampler field: its samplers, the server's CFG
    done = client.completions.create(model="x", prompt=PROMPT, max_tokens=6, seed=7, logprobs=5, temperature=0.5)
    expected = webui(plain, temperature=0.5, guidance_scale=1.5, negative_prompt=NEGATIVE_PRESET)
    assert done.choices[0].logprobs.token_logprobs == expected["logprobs"]["token_logprobs"]


def test_server_defaults_bad_flag_is_a_clear_error(tiny_model_dir):
    import subprocess
    import sys

    from server_process import REPO

    out = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", "serve", "--model", str(tiny_model_dir),
                          "--preset", "no-such-preset"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--preset" in out.stderr and "no-such-preset" in out.stderr
