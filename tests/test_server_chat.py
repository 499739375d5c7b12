"""`POST /v1/chat/completions` on a real server process (default model, llama.cpp backend) with the
openai client: streamed == non-streamed, the prompt is the model's template rendered by
transformers' `apply_chat_template` (an independent renderer), and CFG with `negative_prompt` or
`negative_messages` equals llama.cpp's own two-sequence CFG loop (tests/llamacpp_reference.py) on
those rendered prompts."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from llamacpp_reference import have_llama_cpp, log_softmax64
from test_chat import smollm2_template
from test_server_steering import ref, server  # noqa: F401  (the same llama.cpp server and reference)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")]

TOKENS = 10
MESSAGES = [{"role": "system", "content": "You write short gothic ghost stories."},
            {"role": "user", "content": "Tell me about the lighthouse keeper."}]
NEGATIVE_MESSAGES = [{"role": "system", "content": "You write cheerful children's stories."},
                     {"role": "user", "content": "Tell me about the lighthouse keeper."}]
NEGATIVE = "A dull, generic story."


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed")


def rendered_ids(ref, tiny_tokenizer, messages) -> list[int]:
    """transformers renders the GGUF's template (it uses no bos/eos token); llama.cpp tokenizes the
    text without adding special tokens, as apply_chat_template(tokenize=True) does."""
    text = tiny_tokenizer.apply_chat_template(messages, chat_template=smollm2_template(), tokenize=False,
                                              add_generation_prompt=True)
    return ref.tokenize(text, add_special=False, parse_special=True)


@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 1.5, "negative_prompt": NEGATIVE}], ids=["plain", "cfg"])
def test_chat_streamed_equals_non_streamed_and_the_reference(client, ref, tiny_tokenizer, cfg):
    done = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, temperature=0,
                                          extra_body=cfg)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert done.usage.completion_tokens == TOKENS and done.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, temperature=0,
                                                 extra_body=cfg, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and len(pieces) > 3
    assert "".join(pieces) == choice.message.content
    ids = rendered_ids(ref, tiny_tokenizer, MESSAGES)
    assert done.usage.prompt_tokens == len(ids)
    if cfg:
        expected = ref.greedy_cfg_batched(ids, ref.tokenize(NEGATIVE), 1.5, TOKENS)
    else:
        expected = ref.greedy(ids, TOKENS)
    assert choice.message.content == ref.detokenize(expected)


def test_chat_negative_messages_are_rendered_with_the_same_template(client, ref, tiny_tokenizer):
    done = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, temperature=0,
                                          extra_body={"guidance_scale": 2.0, "negative_messages": NEGATIVE_MESSAGES})
    expected = ref.greedy_cfg_batched(rendered_ids(ref, tiny_tokenizer, MESSAGES),
                                      rendered_ids(ref, tiny_tokenizer, NEGATIVE_MESSAGES), 2.0, TOKENS)
    assert done.choices[0].message.content == ref.detokenize(expected)


def test_chat_n_choices_stop_and_sampler_fields(client):
    done = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, n=3, seed=5,
                                          temperature=1.2, top_p=0.9, extra_body={"min_p": 0.05, "top_k": 40})
    assert [c.index for c in done.choices] == [0, 1, 2] and len({c.message.content for c in done.choices}) > 1
    again = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, n=3, seed=5,
                                           temperature=1.2, top_p=0.9, extra_body={"min_p": 0.05, "top_k": 40})
    assert [c.message.content for c in again.choices] == [c.message.content for c in done.choices]
    first = done.choices[0].message.content
    word = first.split()[1] if len(first.split()) > 1 else first.strip()
    stopped = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, seed=5,
                                             temperature=1.2, top_p=0.9, stop=[word],
                                             extra_body={"min_p": 0.05, "top_k": 40})
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].message.content


@pytest.mark.parametrize("body,field", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": [{"content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": MESSAGES, "negative_messages": "x", "guidance_scale": 1.5}, "negative_messages"),
    ({"messages": MESSAGES, "negative_prompt": "a", "negative_messages": MESSAGES}, "negative_messages"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias"),
])
def test_chat_bad_requests_are_a_400_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/chat/completions", json={"max_tokens": 2, **body}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text


def test_chat_logprobs_are_the_drawn_distribution_streamed_and_not(client, ref, tiny_tokenizer):
    # sampled at temperature 0.8 after top-k 5 with CFG: each token's log-prob and alternatives must be
    # log_softmax(top_k(guided / T)) with guided = u + scale * (c - u), recomputed here along the path
    # the server drew (the items' token_id) from llama.cpp's own logits for both branches
    scale, temperature, k, top = 1.5, 0.8, 5, 3
    args = dict(model="m", messages=MESSAGES, max_tokens=6, temperature=temperature, seed=7, logprobs=True,
                top_logprobs=top, extra_body={"guidance_scale": scale, "negative_prompt": NEGATIVE, "top_k": k})
    done = client.chat.completions.create(**args)
    content = done.choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.model_dump() for i in streamed] == [i.model_dump() for i in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert "".join(i.token for i in content) == done.choices[0].message.content and len(content) >= 4

    story, opposing = rendered_ids(ref, tiny_tokenizer, MESSAGES), ref.tokenize(NEGATIVE)
    for item in content:
        c, u = log_softmax64(ref.last_logits(story)), log_softmax64(ref.last_logits(opposing))
        guided = (u + scale * (c - u)) / temperature
        guided[guided < np.sort(guided)[-k]] = -np.inf
        drawn = log_softmax64(guided)
        token = item.model_extra["token_id"]
        assert item.logprob == pytest.approx(drawn[token], abs=2e-3)
        assert item.bytes == list(ref.token_bytes(token)) and item.token == ref.detokenize([token])
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(np.sort(drawn)[::-1][:top].tolist(), abs=2e-3)
        assert item.model_extra["story_logprob"] == pytest.approx(c[token], abs=2e-3)
        story, opposing = story + [token], opposing + [token]


def test_chat_top_logprobs_without_logprobs_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                              "top_logprobs": 2}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
