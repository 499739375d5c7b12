"""llama.cpp server's own API (tools/server/README.md; SillyTavern's "llama.cpp" text-completion type)
and TabbyAPI's model and token routes (SillyTavern's "TabbyAPI" type): envelopes and shapes.

`POST /completion` answers {"content", "tokens", "stop": true, "stop_type", "stopping_word",
"tokens_predicted", "tokens_evaluated", "timings", "generation_settings", ...}; streaming sends
SSE `data: {"content", "tokens", "stop": false, ...}` per piece and a last `"stop": true` object
with the totals (no [DONE]). `grammar` (GBNF) or `json_schema` constrain the text (llama.cpp
backend only; elsewhere a 400 naming the field). `logit_bias` is llama.cpp's (pairs or an object,
token ids or texts, `false` bans). `n_probs` adds `completion_probabilities` (logprobs.py). Sampler fields
go to translate.py (importers/llamacpp_server.py). TabbyAPI generates through /v1/completions.
"""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import Field, create_model

from ..grammar import GrammarError, grammar_of_json_schema
from ..importers.steering import llamacpp_bias_entries
from . import logprobs
from .bodies import Flag, GenerateBody, Int, Prompt, Text, TokenList
from .errors import APIError
from .translate import LLAMACPP_FLAVOUR, build_preset, check_request_grammar

MAX_PROBS = 100


class CompletionBody(GenerateBody):
    """POST /completion's envelope (llama.cpp's defaults). Unknown keys are ignored: SillyTavern
    sends several backends' names at once. `cache_prompt: false` reads the whole prompt again,
    none of it from the prompt cache (llama.cpp's meaning)."""

    LENGTH_FIELDS = ("n_predict", "max_tokens")  # max_tokens: llama.cpp's alias when n_predict is absent
    prompt: Prompt
    n_predict: Int = None  # -1: until the context is full (or EOS, a stop string)
    max_tokens: Int = None
    n_probs: Annotated[Int, Field(ge=0, le=MAX_PROBS)] = 0
    post_sampling_probs: Flag = False
    ignore_eos: Flag = False
    cache_prompt: Flag = True
    return_tokens: Flag = False


def parse_completion(body: dict, service) -> tuple[CompletionBody, object, int]:
    """The envelope, its Preset, and the number of new tokens (-1: what the window leaves)."""
    c = read_body(CompletionBody, body, service)
    asked = c.n_predict if c.n_predict is not None else c.max_tokens
    prompt_len = len(service.tokenize(c.prompt)) if isinstance(c.prompt, str) else len(c.prompt)
    if asked is None or asked < 0:
        max_new = service.n_ctx - prompt_len
        if max_new < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens and fills the model's context window "
                                f"of {service.n_ctx} tokens: set `n_predict`", "prompt")
    elif asked == 0 or asked >= service.n_ctx:
        raise APIError(400, f"`{c.length_field}` is {asked}; it must be between 1 and {service.n_ctx - 1} "
                            f"(this model's context window), or -1", c.length_field)
    else:
        max_new = asked
    body, grammar_field = _with_schema_grammar(body, service)
    body = _with_bias_ids(body, service)
    preset, c._skipped = build_preset(body, LLAMACPP_FLAVOUR, max_new, c.stop, defaults=service.defaults,
                                      vocab_size=service.vocab_size)
    check_request_grammar(service, preset, body, (grammar_field,))
    return c, preset, max_new


def _with_schema_grammar(body: dict, service) -> tuple[dict, str]:
    """(body, the field its grammar came from): as llama.cpp server, a `json_schema` becomes the
    grammar (its JSON texts) unless the request sends a `grammar`, which wins; empty or null ones
    are not sent."""
    if not body.get("grammar") and body.get("json_schema") is not None:
        try:
            return {**body, "grammar": grammar_of_json_schema(service.backend, body["json_schema"])}, "json_schema"
        except GrammarError as err:
            raise APIError(400, f"`json_schema`: {err}", "json_schema") from None
    return body, "grammar"


def _with_bias_ids(body: dict, service) -> dict:
    """`logit_bias` with its texts as token ids: as llama.cpp server, a text's bias goes to every
    token of the text (tokenized without BOS), so `[["Hello, World!", -0.5]]` lowers each of them."""
    entries = llamacpp_bias_entries(body.get("logit_bias"))
    if not entries or not any(isinstance(key, str) for key, _ in entries):
        return body
    pairs = []
    for key, bias in entries:
        value = False if bias == float("-inf") else bias
        ids = service.tokenize(key, special=False) if isinstance(key, str) else [key]
        pairs += [[token, value] for token in ids]
    return {**body, "logit_bias": pairs}


def read_body(model, body, service):
    from .bodies import read

    return read(model, body, vocab_size=service.vocab_size)


STOP_TYPE = {"eos": "eos", "max_tokens": "limit", "stop": "word"}


def stopping_word(job, stops, service) -> str:
    """The stop string that ended the job ("" if none did)."""
    if job.stop_reason != "stop":
        return ""
    rest = service.detokenize(job.token_ids)[len(job.text):]
    return next((s for s in stops if rest.startswith(s)), "")


def timings(job, prompt_n: int) -> dict:
    stats = job.stats
    prompt_s = stats.first_token_seconds or 0.0
    predicted_n = len(job.token_ids)
    predicted_s = max(stats.seconds - prompt_s, 0.0)
    cache_n = job.cached_tokens  # llama.cpp: prompt_n counts the prompt tokens read, cache_n the reused
    read_n = max(prompt_n - cache_n, 0)
    return {"cache_n": cache_n, "prompt_n": read_n, "prompt_ms": prompt_s * 1000,
            "prompt_per_token_ms": prompt_s * 1000 / max(read_n, 1),
            "prompt_per_second": read_n / prompt_s if prompt_s else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_s * 1000,
            "predicted_per_token_ms": predicted_s * 1000 / max(predicted_n, 1),
            "predicted_per_second": predicted_n / predicted_s if predicted_s else 0.0}


def probabilities(job, c: CompletionBody, service, upto: int | None = None, start: int = 0) -> list[dict]:
    return logprobs.llamacpp(logprobs.shown(job, upto)[start:], service.token_text, service.token_bytes,
                             c.post_sampling_probs)


def generation_settings(c: CompletionBody, preset, max_new: int, service) -> dict:
    return {"n_ctx": service.n_ctx, "n_predict": max_new, "seed": c.seed if c.seed is not None else -1,
            "stream": c.stream, "n_probs": c.n_probs, "ignore_eos": c.ignore_eos, "stop": list(preset.stop),
            "guidance_scale": preset.cfg.scale, "negative_prompt": preset.cfg.opposing_prompt,
            "samplers": [s.name for s in preset.samplers], "post_sampling_probs": c.post_sampling_probs,
            "grammar": preset.grammar}


def final(job, c: CompletionBody, preset, max_new: int, prompt_n: int, service, streamed: bool) -> dict:
    """The non-streamed answer, or the last streamed object (content and tokens already sent)."""
    out = {"index": 0, "content": "" if streamed else job.text,
           "tokens": [] if streamed or not c.return_tokens else list(job.token_ids), "id_slot": -1,
           "stop": True, "model": service.model_name, "tokens_predicted": len(job.token_ids),
           "tokens_evaluated": prompt_n, "generation_settings": generation_settings(c, preset, max_new, service),
           "prompt": c.prompt if isinstance(c.prompt, str) else service.detokenize(c.prompt),
           "has_new_line": "\n" in job.text, "truncated": job.stats.kept_tokens < job.stats.prompt_tokens,
           "stop_type": STOP_TYPE.get(job.stop_reason, "none"),
           "stopping_word": stopping_word(job, preset.stop, service), "tokens_cached": prompt_n + len(job.token_ids),
           "timings": timings(job, prompt_n)}
    if c.n_probs and not streamed:
        out["completion_probabilities"] = probabilities(job, c, service)
    return out


def partial(job, c: CompletionBody, piece: str, tokens: list[int], upto: int, prompt_n: int, probs) -> dict:
    out = {"index": 0, "content": piece, "tokens": tokens, "stop": False, "id_slot": -1,
           "tokens_predicted": upto, "tokens_evaluated": prompt_n}
    if probs is not None:
        out["completion_probabilities"] = probs
    return out


# /tokenize: `content`, `add_special` (default false: no BOS), `with_pieces`; /detokenize: `tokens`
TokenizeBody = create_model("TokenizeBody", content=(Text, ...), add_special=(Flag, False),
                            with_pieces=(Flag, False))
DetokenizeBody = create_model("DetokenizeBody", tokens=(TokenList, ...))


def props_response(service) -> dict:
    """GET /props: the slots' default settings, the slot count, the model, the modalities."""
    return {"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": service.n_ctx, "speculative": False,
                                            "is_processing": service.running() > 0,
                                            "params": {"n_predict": -1, "seed": -1, "temperature": 0.8,
                                                       "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                                       "n_probs": 0, "samplers": ["penalties", "dry",
                                                       "top_n_sigma", "top_k", "typ_p", "top_p", "min_p",
                                                       "xtc", "temperature"]}},
            "total_slots": service.scheduler.max_parallel, "model_path": service.model_name,
            "chat_template": "", "modalities": {"vision": False, "audio": False},
            "build_info": "cfg-textgen", "is_sleeping": False}


# ---- TabbyAPI: SillyTavern's status check and token counting --------------------------------

def tabby_model_card(service) -> dict:
    return {"id": service.model_name, "object": "model", "created": int(time.time()), "owned_by": "tabbyAPI",
            "logging": None, "parameters": {"max_seq_len": service.n_ctx, "cache_size": service.n_ctx,
                                            "prompt_template": None}}


TabbyEncodeBody = create_model("TabbyEncodeBody", text=(Text, ...), add_bos_token=(Flag, True))
TabbyDecodeBody = create_model("TabbyDecodeBody", tokens=(TokenList, ...))
