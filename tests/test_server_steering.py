"""Logit bias, token bans and grammars through `cfg-textgen serve` (a real process on the default
model, llama.cpp backend), checked against llama.cpp's own loops written against its low-level API
(tests/llamacpp_reference.py): a banned token is never produced, and the text equals the
reference's greedy text with the same token banned at every step, with CFG off and on."""

from __future__ import annotations

import json

import httpx
import pytest

from llamacpp_reference import LlamaRef, have_llama_cpp
from server_process import ServerProcess

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")]

STORY = "The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs and"
NEGATIVE = "A dull, generic story."
TOKENS = 8
YES_NO = 'root ::= ("yes" | "no")'


@pytest.fixture(scope="module")
def server():
    # flash attention on, as in the reference: these tests compare greedy texts with llama.cpp's
    # own cold loop token for token, and the server's prompt cache (an earlier request's cells)
    # changes the rounding. Measured in-process with plain attention (the CPU default): a cold
    # read matched the reference loop's 8 tokens, one after an earlier request parted at the 7th.
    # With flash attention the cache moves logits too (0.48 at a 400-token prompt's end), but
    # these texts do not part; the default mode does not promise cache-independent text,
    # --deterministic does
    srv = ServerProcess("--backend", "llama.cpp", "--parallel", "2", "--flash-attn", "on")
    yield srv
    assert srv.terminate() == 0, srv.stderr()


@pytest.fixture(scope="module")
def ref():
    with LlamaRef(flash_attn_type=1) as r:  # the server's attention (below)
        yield r


def post(srv, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(srv.url + path, json=body, timeout=600)
    assert r.status_code == status, r.text
    return r.json()


def complete(srv, **body) -> str:
    body = {"prompt": STORY, "max_tokens": TOKENS, "do_sample": False, **body}
    return post(srv, "/v1/completions", body)["choices"][0]["text"]


def reference_tokens(ref, ban, scale: float = 1.0) -> list[int]:
    ids = ref.tokenize(STORY)
    if scale == 1.0:
        return ref.greedy(ids, TOKENS, ban=ban)
    opposing = ref.tokenize(NEGATIVE)  # the opposing prompt is encoded as a story is (BOS first)
    return ref.greedy_cfg_batched(ids, opposing, scale, TOKENS, ban=ban)


def reference_text(ref, ban, scale: float = 1.0) -> str:
    return ref.detokenize(reference_tokens(ref, ban, scale))


def greedy_top(ref) -> int:
    return int(ref.last_logits(ref.tokenize(STORY)).argmax())


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_logit_bias_minus_100_never_produces_the_greedy_top_token(server, ref, scale):
    plain_tokens = reference_tokens(ref, ban=(), scale=scale)
    top = plain_tokens[0]  # greedy's first pick, with CFG at 1.5
    cfg = {"guidance_scale": scale, "negative_prompt": NEGATIVE} if scale != 1 else {}
    plain = complete(server, **cfg)
    assert plain == ref.detokenize(plain_tokens)
    biased_tokens = reference_tokens(ref, ban=[top], scale=scale)
    assert top not in biased_tokens
    biased = complete(server, logit_bias={str(top): -100}, **cfg)
    assert biased == ref.detokenize(biased_tokens) != plain


def test_token_bans_of_each_api_equal_the_reference_ban(server, ref):
    top = greedy_top(ref)
    expected = reference_text(ref, ban=[top])
    assert complete(server, custom_token_bans=f" {top}, ") == expected  # the web UI's comma list
    assert complete(server, banned_tokens=[top]) == expected  # TabbyAPI's list of ids
    kobold = post(server, "/api/v1/generate", {"prompt": STORY, "max_length": TOKENS, "top_k": 1,
                                               "banned_tokens": [top]})
    assert kobold["results"][0]["text"] == expected


@pytest.mark.parametrize("field,value", [("logit_bias", {"abc": 1}), ("logit_bias", {"5": "x"}),
                                         ("logit_bias", {"99999999": 1}), ("custom_token_bans", "1,two"),
                                         ("banned_tokens", [-3])])
def test_bad_steering_fields_are_a_400_naming_the_field(server, field, value):
    err = post(server, "/v1/completions", {"prompt": STORY, "max_tokens": 2, field: value}, status=400)
    assert err["error"]["param"] == field, err


@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0])
def test_grammar_yes_or_no_yields_exactly_yes_or_no(server, scale):
    cfg = {"guidance_scale": scale, "negative_prompt": "Answer at length."} if scale != 1 else {}
    prompt = "Question: Is the sea salty? Answer yes or no.\nAnswer:"
    for body in ({"do_sample": False}, {"temperature": 1.0, "seed": 3}, {"temperature": 2.0, "seed": 11}):
        text = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "grammar_string": YES_NO,
                                                 **cfg, **body})["choices"][0]["text"]
        assert text in ("yes", "no"), (body, text)
    kobold = post(server, "/api/v1/generate", {"prompt": prompt, "max_length": 8, "grammar": YES_NO, **cfg})
    assert kobold["results"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("path,field", [("/v1/completions", "grammar_string"), ("/api/v1/generate", "grammar")])
def test_invalid_grammar_is_a_400_naming_the_field(server, path, field):
    body = {"prompt": STORY, "max_tokens": 2, "max_length": 2, field: 'root ::= ("yes" | '}
    err = post(server, path, body, status=400)
    named = err["error"]["param"] if "error" in err else err["detail"]["field"]
    assert named == field, err
    assert post(server, "/v1/completions", {"prompt": STORY, "max_tokens": 2})["choices"]  # still serving


YES_NO_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_llamacpp_route_grammar_and_json_schema_constrain_the_text(server, scale):
    cfg = {"guidance_scale": scale, "negative_prompt": "Answer at length."} if scale != 1 else {}
    body = {"prompt": "Question: Is the sea salty? Answer yes or no.\nAnswer:", "n_predict": 12, "seed": 5, **cfg}
    assert post(server, "/completion", {**body, "grammar": YES_NO})["content"] in ("yes", "no")
    streamed = httpx.post(server.url + "/completion", json={**body, "grammar": YES_NO, "stream": True}, timeout=600)
    assert "".join(json.loads(line[6:])["content"] for line in streamed.text.splitlines()
                   if line.startswith("data: ")) in ("yes", "no")
    # the schema's JSON texts: `{"answer": "yes"}` give or take llama.cpp's optional spaces
    text = post(server, "/completion", {**body, "n_predict": 24, "json_schema": YES_NO_SCHEMA})["content"]
    assert json.loads(text) in ({"answer": "yes"}, {"answer": "no"}), text
    # a grammar wins over a schema (llama.cpp server's rule)
    both = post(server, "/completion", {**body, "grammar": YES_NO, "json_schema": YES_NO_SCHEMA})["content"]
    assert both in ("yes", "no")


@pytest.mark.parametrize("field,value", [("grammar", 'root ::= ("yes" | '), ("json_schema", {"type": "nonsense"}),
                                         ("json_schema", "not a schema")])
def test_llamacpp_route_bad_grammar_or_schema_is_a_400_naming_the_field(server, field, value):
    err = post(server, "/completion", {"prompt": STORY, "n_predict": 2, field: value}, status=400)
    assert err["error"]["param"] == field, err


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_llamacpp_route_logit_bias_false_bans_as_pairs_object_or_text(server, ref, scale):
    """llama.cpp's own shapes of `logit_bias` on `/completion`: `[[id, false]]`, `{"id": false}` and
    `[[text, false]]` (each token of the text; here a text of one token) all ban the token."""
    top = reference_tokens(ref, ban=(), scale=scale)[0]
    text = ref.detokenize([top])
    assert ref.tokenize(text, add_special=False) == [top]
    expected = reference_text(ref, ban=[top], scale=scale)
    cfg = {"guidance_scale": scale, "negative_prompt": NEGATIVE} if scale != 1 else {}
    for bias in ([[top, False]], {str(top): False}, [[text, False]], [["junk"], [top, False], [1, True]]):
        got = post(server, "/completion", {"prompt": STORY, "n_predict": TOKENS, "temperature": 0,
                                           "logit_bias": bias, **cfg})
        assert got["content"] == expected, bias


def test_llamacpp_route_logit_bias_is_added_as_given(server, ref):
    """A bias of +30 on the greedy top's runner-up makes it the first token (llama.cpp adds the
    number as it is: no clamp, no -100 rule), and the same bias in the OpenAI shape on
    /v1/completions gives the same text."""
    logits = ref.last_logits(ref.tokenize(STORY))
    second = int(logits.argsort()[-2])
    got = post(server, "/completion", {"prompt": STORY, "n_predict": TOKENS, "temperature": 0,
                                       "logit_bias": [[second, 30]]})
    assert got["content"].startswith(ref.detokenize([second]))
    assert got["content"] == complete(server, logit_bias={str(second): 30})
