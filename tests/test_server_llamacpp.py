"""SillyTavern's "llama.cpp" and "TabbyAPI" text-completion types against `cfg-textgen serve` (a real
process, tiny model): the routes answer with the shapes llama.cpp's tools/server/README.md and
TabbyAPI document, and SillyTavern's own request body (recorded traffic) is taken as llama.cpp
takes it. The llama.cpp-server request importer is checked on its own below."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server_process import serving

PROMPT = "Once upon a time there was a little fox"
TRAFFIC = Path("/work/shared/client-traffic/sillytavern-ooba-stream-logprobs.jsonl")
FINAL_KEYS = {"index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
              "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word",
              "tokens_cached", "timings"}
PARTIAL_KEYS = {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"}
TIMINGS = {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
           "predicted_per_token_ms", "predicted_per_second"}
# SillyTavern's llama.cpp sampler order setting (textgen-settings.js), with a name we do not have
ST_SAMPLERS = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "tfs_z", "top_p", "min_p", "xtc",
               "temperature", "adaptive_p", "infill"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving("--model", str(tiny_model_dir), "--parallel", "2") as srv:
        yield srv


def post(srv, path, body):
    response = httpx.post(srv.url + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def stream_objects(srv, body) -> list[dict]:
    text = post(srv, "/completion", {**body, "stream": True}).text
    assert "[DONE]" not in text  # llama.cpp's own API ends with `"stop": true`, not [DONE]
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_llamacpp_completion_has_the_servers_shape(server):
    body = {"prompt": PROMPT, "n_predict": 6, "seed": 3, "return_tokens": True, "cache_prompt": True,
            "n_probs": 4, "temperature": 0.9}
    done = post(server, "/completion", body).json()
    assert FINAL_KEYS <= set(done) and done["stop"] is True
    assert TIMINGS <= set(done["timings"])
    assert done["tokens_predicted"] == len(done["tokens"]) == 6 and done["stop_type"] == "limit"
    assert done["tokens_evaluated"] == len(post(server, "/tokenize", {"content": PROMPT}).json()["tokens"])
    assert post(server, "/detokenize", {"tokens": done["tokens"]}).json() == {"content": done["content"]}
    probs = done["completion_probabilities"]
    assert [p["id"] for p in probs] == done["tokens"]
    for p in probs:
        assert {"id", "token", "bytes", "logprob", "top_logprobs"} <= set(p)
        assert 0 < len(p["top_logprobs"]) <= 4
        assert set(p["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}

    # streamed: the same tokens in pieces, `stop: false` objects, then the totals with `stop: true`
    objects = stream_objects(server, body)
    *parts, last = objects
    assert all(PARTIAL_KEYS <= set(o) and o["stop"] is False for o in parts)
    assert last["stop"] is True and FINAL_KEYS <= set(last) and last["content"] == ""
    assert "".join(o["content"] for o in parts) == done["content"]
    assert [t for o in parts for t in o["tokens"]] == done["tokens"]
    assert [p for o in parts for p in o["completion_probabilities"]] == probs


def test_llamacpp_post_sampling_probs_are_probabilities(server):
    body = {"prompt": PROMPT, "n_predict": 4, "seed": 3, "n_probs": 3, "top_k": 5}
    logs = post(server, "/completion", body).json()["completion_probabilities"]
    probs = post(server, "/completion", {**body, "post_sampling_probs": True}).json()["completion_probabilities"]
    import math

    for lp, p in zip(logs, probs, strict=True):
        assert set(p) >= {"id", "token", "bytes", "prob", "top_probs"} and "logprob" not in p
        assert p["prob"] == pytest.approx(math.exp(lp["logprob"]))
        assert [t["prob"] for t in p["top_probs"]] == pytest.approx([math.exp(t["logprob"]) for t in lp["top_logprobs"]])


def test_llamacpp_stop_string_and_ignore_eos(server):
    done = post(server, "/completion", {"prompt": PROMPT, "n_predict": 40, "seed": 5, "top_k": 1}).json()
    text = done["content"]
    assert len(text) > 3
    stop = text[2:4]
    cut = post(server, "/completion", {"prompt": PROMPT, "n_predict": 40, "seed": 5, "top_k": 1,
                                       "stop": [stop]}).json()
    assert cut["stop_type"] == "word" and cut["stopping_word"] == stop and cut["content"] == text[:text.index(stop)]


def test_llamacpp_tokenize_detokenize_props_health(server):
    plain = post(server, "/tokenize", {"content": PROMPT}).json()
    assert set(plain) == {"tokens"} and all(isinstance(t, int) for t in plain["tokens"])
    pieces = post(server, "/tokenize", {"content": PROMPT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain["tokens"] and "".join(p["piece"] for p in pieces) == PROMPT
    assert post(server, "/detokenize", {"tokens": plain["tokens"]}).json() == {"content": PROMPT}
    props = httpx.get(server.url + "/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] > 0
    assert {"model_path", "modalities", "build_info"} <= set(props)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    bad = httpx.post(server.url + "/tokenize", json={"text": PROMPT})
    assert bad.status_code == 400 and "content" in bad.json()["error"]["message"]


def test_llamacpp_sillytavern_body_is_taken_with_its_samplers_and_cfg(server):
    # the body SillyTavern's server forwarded (its "llama.cpp" type posts the same generate_data)
    recorded = [json.loads(line) for line in TRAFFIC.read_text().splitlines()]
    (st,) = [r["body"] for r in recorded if r["path"] == "/v1/completions"]
    body = {**st, "api_type": "llamacpp", "samplers": ST_SAMPLERS, "n_predict": 5, "stream": False,
            "guidance_scale": 1.5, "seed": 2, "prompt": st["prompt"][-400:]}
    done = post(server, "/completion", body).json()
    assert done["generation_settings"]["guidance_scale"] == 1.5
    assert done["generation_settings"]["negative_prompt"] == st["negative_prompt"]
    assert len(done["completion_probabilities"]) == done["tokens_predicted"] - (done["stop_type"] == "eos")
    assert all(len(p["top_logprobs"]) <= st["n_probs"] for p in done["completion_probabilities"])
    # streamed as SillyTavern reads it: `content`, and `completion_probabilities` per object
    objects = stream_objects(server, body)
    assert "".join(o["content"] for o in objects) == done["content"]


def test_tabby_status_check_and_token_routes_pass_sillytavern(server):
    # SillyTavern's TabbyAPI status: GET /v1/model/list (data: [{id}]), then GET /v1/model (id)
    listed = httpx.get(server.url + "/v1/model/list").json()
    assert listed["object"] == "list" and isinstance(listed["data"], list)
    name = listed["data"][0]["id"]
    card = httpx.get(server.url + "/v1/model").json()
    assert card["id"] == name and card["object"] == "model" and card["parameters"]["max_seq_len"] > 0
    encoded = post(server, "/v1/token/encode", {"text": PROMPT}).json()
    assert encoded["length"] == len(encoded["tokens"]) > 0
    assert post(server, "/v1/token/decode", {"tokens": encoded["tokens"]}).json() == {"text": PROMPT}


# ---- the importer -----------------------------------------------------------------------------


def _samplers(body):
    from cfg_textgen.importers.llamacpp_server import import_request

    data, report = import_request(body)
    return [(s["sampler"], {k: v for k, v in s.items() if k != "sampler"}) for s in data["samplers"]], data, report


def test_llamacpp_importer_takes_llamacpp_defaults_and_order():
    samplers, _, _ = _samplers({})
    assert samplers == [("top_k", {"k": 40}), ("top_p", {"p": 0.95}), ("min_p", {"p": 0.05}),
                        ("temperature", {"temperature": 0.8})]
    samplers, data, _ = _samplers({"samplers": ["temperature", "top_k"], "top_k": 7, "temperature": 0.5,
                                   "guidance_scale": 2, "negative_prompt": "no"})
    assert samplers == [("temperature", {"temperature": 0.5}), ("top_k", {"k": 7})]
    assert data["cfg"] == {"scale": 2, "opposing_prompt": "no"}


def test_llamacpp_importer_runs_only_listed_samplers_and_skips_unknown_names():
    samplers, _, report = _samplers({"samplers": "kt", "repeat_penalty": 1.3, "top_k": 3})
    assert [s for s, _ in samplers] == ["top_k", "temperature"]  # penalties are not listed: not run
    assert "repeat_penalty" in report.render()
    samplers, _, report = _samplers({"samplers": ["penalties", "infill", "temperature"], "repeat_penalty": 1.3})
    assert [s for s, _ in samplers] == ["repetition_penalty", "temperature"]
    assert report.skipped == ["infill"] and "infill" in report.render()


def test_llamacpp_importer_dynatemp_range_spreads_temperature():
    samplers, _, _ = _samplers({"samplers": ["temperature"], "temperature": 1.0, "dynatemp_range": 0.4})
    assert samplers == [("dynamic_temperature", {"low": 0.6, "high": 1.4, "exponent": 1.0})]


def test_llamacpp_importer_repeat_last_n_0_with_penalties_not_listed():
    # what SillyTavern 1.12's "llama.cpp" type really sent in a browser run: no "penalties" in
    # `samplers`, repeat_last_n 0 (llama.cpp: penalties off) and repeat_penalty 1.1; it was a 500
    body = {"samplers": ["top_k", "tfs_z", "typical_p", "top_p", "min_p", "xtc", "temperature"],
            "repeat_penalty": 1.1, "repeat_last_n": 0, "top_k": 0, "temperature": 0.7}
    samplers, _, report = _samplers(body)
    assert "repetition_penalty" not in [s for s, _ in samplers]
    assert "repeat_penalty" in report.render()  # said: not listed, so llama.cpp does not run it
    samplers, _, _ = _samplers({**body, "samplers": ["penalties", "temperature"]})
    assert [s for s, _ in samplers] == ["temperature"]  # listed, but repeat_last_n 0 turns it off


@pytest.mark.parametrize("field,value", [("grammar", 'root ::= ("yes" | "no")'),
                                         ("json_schema", {"type": "object", "properties": {"a": {"type": "string"}}})])
def test_llamacpp_grammar_fields_on_transformers_are_a_400_naming_the_field(server, field, value):
    r = httpx.post(server.url + "/completion", json={"prompt": PROMPT, "n_predict": 2, field: value}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "llama.cpp backend" in r.json()["error"]["message"]
