"""Token log-probabilities from `cfg-textgen serve` (a real process on a tiny random model), checked
against the distribution recomputed here from the model's own raw logits for both branches and the
paper's formula:

    guided = u + scale * (c - u)        c, u: log_softmax of the story / opposing-branch logits
    drawn  = log_softmax(top_k(guided / temperature))

Both branches are teacher-forced with a plain transformers forward over the whole sequence (the
server decodes incrementally with a KV cache), so the reference shares no code with the engine.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from server_process import serving

PROMPT = "Once upon a time there was a little fox"
NEGATIVE = "The dragon was awake"
SCALE, TEMPERATURE, TOP_K, N = 1.8, 0.7, 20, 5


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving("--model", str(tiny_model_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def last_logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)


def drawn_from(model, story: list[int], opposing: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distribution the next token is drawn from, the story-alone log-probs), by the formula."""
    c, u = last_logp(model, story), last_logp(model, opposing)
    guided = (u + SCALE * (c - u)) / TEMPERATURE
    kth = torch.topk(guided, TOP_K).values[-1]
    guided = guided.masked_fill(guided < kth, float("-inf"))
    return torch.log_softmax(guided, dim=-1), c


def body(**extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": 8, "temperature": TEMPERATURE, "top_k": TOP_K,
            "guidance_scale": SCALE, "negative_prompt": NEGATIVE, "logprobs": N, **extra}


def post(srv, path, data):
    response = httpx.post(srv.url + path, json=data, timeout=120)
    assert response.status_code == 200, response.text
    return response


def streamed_logprobs(srv, data) -> tuple[str, dict]:
    """The chunks' text and their logprobs joined list by list."""
    events = [line[6:] for line in post(srv, "/v1/completions", {**data, "stream": True}).text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text, joined = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                        "story_logprobs": []}
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        text += choice["text"]
        if choice["logprobs"] is not None:
            for key in joined:
                joined[key] += choice["logprobs"][key]
    return text, joined


def test_logprobs_top_n_equal_the_guided_distribution_the_token_was_drawn_from(server, reference):
    model, tokenizer = reference
    # greedy: the pick is the argmax of the very distribution reported, so the path is ours to follow
    done = post(server, "/v1/completions", body(do_sample=False)).json()
    lp = done["choices"][0]["logprobs"]
    story = tokenizer(PROMPT)["input_ids"]
    opposing = tokenizer(NEGATIVE)["input_ids"]
    assert len(lp["tokens"]) == done["usage"]["completion_tokens"] == 8
    for step in range(8):
        drawn, c = drawn_from(model, story, opposing)
        values, ids = torch.sort(drawn, descending=True, stable=True)
        token = int(ids[0])
        assert lp["tokens"][step] == tokenizer.decode([token])
        assert lp["token_logprobs"][step] == pytest.approx(float(drawn[token]), abs=1e-4)
        expected: dict[str, float] = {}
        for i, v in zip(ids[:N].tolist(), values[:N].tolist()):
            expected.setdefault(tokenizer.decode([i]), v)  # one text, two ids: the likelier
        got = lp["top_logprobs"][step]
        assert list(got) == list(expected)
        assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)
        # our extension: the same token under the story alone (raw logits, no CFG, no samplers)
        assert lp["story_logprobs"][step] == pytest.approx(float(c[token]), abs=1e-4)
        story, opposing = story + [token], opposing + [token]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    assert "".join(lp["tokens"]) == done["choices"][0]["text"]


def test_logprobs_streamed_equal_non_streamed_and_sillytavern_reads_one_object_per_chunk(server):
    data = body(seed=11, temperature=1.2)  # sampled, seeded: the same tokens both ways
    done = post(server, "/v1/completions", data).json()["choices"][0]
    text, joined = streamed_logprobs(server, data)
    assert text == done["text"]
    assert joined == done["logprobs"]
    # SillyTavern: choices[0].logprobs.top_logprobs[0] of each chunk is a {token: logprob} object
    events = [json.loads(line[6:]) for line in post(server, "/v1/completions", {**data, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    firsts = [e["choices"][0]["logprobs"]["top_logprobs"][0] for e in events if e["choices"][0]["text"]]
    assert firsts and all(isinstance(t, dict) and 0 < len(t) <= N for t in firsts)
    assert all(v <= 0 for t in firsts for v in t.values())


def test_logprobs_without_the_field_are_null(server):
    done = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}).json()
    assert done["choices"][0]["logprobs"] is None


def test_logprobs_openai_client_reads_them(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    done = client.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=TEMPERATURE, seed=5,
                                     logprobs=3, extra_body={"guidance_scale": SCALE, "top_k": TOP_K})
    lp = done.choices[0].logprobs
    n = len(lp.tokens)  # every generated token but a closing end-of-text
    assert n == done.usage.completion_tokens - (done.choices[0].finish_reason == "stop") > 0
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == done.choices[0].text
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-9
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert len(lp.model_extra["story_logprobs"]) == n


def test_logprobs_kobold_result_and_last_logprobs_have_koboldcpp_shape(server):
    request = {"prompt": PROMPT, "max_length": 6, "temperature": TEMPERATURE, "top_k": TOP_K,
               "guidance_scale": SCALE, "negative_prompt": NEGATIVE, "logprobs": True, "genkey": "KCPP1234",
               "sampler_seed": 3}
    result = post(server, "/api/v1/generate", request).json()["results"][0]
    lp = result["logprobs"]
    n = len(lp["tokens"])
    assert n == result["completion_tokens"] - (result["finish_reason"] == "stop") > 0
    assert "".join(lp["tokens"]) == result["text"]
    # koboldcpp.py builds OpenAI chat's `content` list and the completions lists in one object
    assert [c["token"] for c in lp["content"]] == lp["tokens"]
    assert [c["logprob"] for c in lp["content"]] == lp["token_logprobs"]
    assert [c["story_logprob"] for c in lp["content"]] == lp["story_logprobs"]
    assert [c["token_id"] for c in lp["content"]] == lp["token_ids"]
    for item in lp["content"]:
        assert item["bytes"] == list(item["token"].encode())
        assert 0 < len(item["top_logprobs"]) <= 10
        assert set(item["top_logprobs"][0]) == {"token", "token_id", "logprob", "bytes"}
        assert item["top_logprobs"][0]["logprob"] >= item["logprob"]
    assert post(server, "/api/extra/last_logprobs", {"genkey": "KCPP1234"}).json() == {"logprobs": lp}
    assert post(server, "/api/extra/last_logprobs", {"genkey": "someone-else"}).json() == {"logprobs": None}
    plain = post(server, "/api/v1/generate", {"prompt": PROMPT, "max_length": 2}).json()["results"][0]
    assert plain["logprobs"] is None


def test_logprobs_sampled_tokens_match_the_formula_step_by_step_on_the_llamacpp_route(server, reference):
    # sampled, not greedy: llama.cpp's shape names each token's id, so the reference can follow the
    # path the server drew (top-k then temperature gives the same distribution as the reverse)
    model, tokenizer = reference
    done = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "seed": 9, "n_probs": N,
                                        "samplers": ["top_k", "temperature"], "top_k": TOP_K,
                                        "temperature": TEMPERATURE, "guidance_scale": SCALE,
                                        "negative_prompt": NEGATIVE, "return_tokens": True}).json()
    story, opposing = tokenizer(PROMPT)["input_ids"], tokenizer(NEGATIVE)["input_ids"]
    probs = done["completion_probabilities"]
    assert [p["id"] for p in probs] == done["tokens"][:len(probs)] and len(probs) >= 6
    for p in probs:
        drawn, c = drawn_from(model, story, opposing)
        values, ids = torch.sort(drawn, descending=True, stable=True)
        assert p["logprob"] == pytest.approx(float(drawn[p["id"]]), abs=1e-4)
        assert [t["id"] for t in p["top_logprobs"]] == ids[:N].tolist()
        assert [t["logprob"] for t in p["top_logprobs"]] == pytest.approx(values[:N].tolist(), abs=1e-4)
        assert p["story_logprob"] == pytest.approx(float(c[p["id"]]), abs=1e-4)
        story, opposing = story + [p["id"]], opposing + [p["id"]]
