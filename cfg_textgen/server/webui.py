"""text-generation-webui's OpenAI-compatible API (modules/api/): request envelope and response shapes.

Fields and defaults follow the web UI's typing.py: `max_tokens` 16 (`max_new_tokens` is the web
UI's name for it; `max_tokens` wins when both are sent, as SillyTavern sends both), `n` 1, `seed`
-1 (random), `stop` plus the web UI's `stopping_strings`. The OpenAI fields may be null (the
web UI types them Optional); null means "not given". Sampler fields go to translate.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from pydantic import Field, create_model

from . import logprobs
from .bodies import Count, Flag, GenerateBody, Int, Prompt, Stops, Text, TokenList, read
from .errors import APIError
from .translate import KOBOLD_FLAVOUR, build_preset, check_request_grammar, flavour_of_completion

NULLABLE = frozenset({"model", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
                      "n", "presence_penalty", "stop", "stream", "suffix", "temperature", "top_p", "user", "seed"})
DEFAULT_MAX_TOKENS = 16
MAX_N = 8  # choices per request: each is a whole generation
MAX_LOGPROBS = 100  # alternatives per token (SillyTavern asks for 10)


class ChoicesBody(GenerateBody):
    """What /v1/completions and /v1/chat/completions share: lengths, `n`, seeds, stops, flags. A
    field typed without None may be absent but not null (as in the web UI's typing.py); NULLABLE's
    nulls are dropped before. Unknown keys are ignored. `max_tokens` wins when both lengths are sent.
    `cache_prompt: false` reads the whole prompt again, none of it from the prompt cache: llama.cpp
    server reads it on its OpenAI-compatible routes too (one parser for every completion route);
    the web UI has no such field (it always asks its llama.cpp server for the cache)."""

    LENGTH_FIELDS = ("max_tokens", "max_new_tokens")
    max_tokens: Count = None
    max_new_tokens: Count = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    stopping_strings: Stops = []
    ban_eos_token: Flag = False
    truncate: Flag = True
    cache_prompt: Flag = True
    preset: Text = None


class CompletionBody(ChoicesBody):
    """POST /v1/completions' envelope."""

    prompt: Prompt
    echo: Flag = False
    logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] = None  # OpenAI's: n alternatives per token
    truncation_length: Annotated[Int, Field(ge=0)] = None
    add_bos_token: Flag = True


def parse_completion(body: dict, service) -> tuple[CompletionBody, object]:
    """The request's envelope (its prompt fitted to the window) and its Preset."""
    body = {k: v for k, v in body.items() if not (v is None and k in NULLABLE)}
    c = read(CompletionBody, body, vocab_size=service.vocab_size)
    max_new = c.max_tokens or c.max_new_tokens or DEFAULT_MAX_TOKENS
    if max_new >= service.n_ctx:
        raise APIError(400, f"`{c.length_field}` is {max_new}, but the model's context window is {service.n_ctx} "
                            f"tokens (prompt included): ask for fewer", c.length_field)
    prompt = c.prompt
    if not c.add_bos_token and isinstance(prompt, str):
        prompt = service.tokenize(prompt, special=False) or prompt
    flavour = flavour_of_completion(body)
    renames = {"max_length": "max_tokens"} if flavour == KOBOLD_FLAVOUR else None
    preset, c._skipped = build_preset(body, flavour, max_new, c.stop + c.stopping_strings,
                                      c.preset if flavour != KOBOLD_FLAVOUR else None, renames,
                                      defaults=service.defaults, vocab_size=service.vocab_size)
    check_request_grammar(service, preset, body, ("grammar_string", "grammar"))
    c.prompt = service.fit(prompt, c.truncation_length, max_new)
    return c, preset


TextBody = create_model("TextBody", text=(Text, ...))  # /v1/internal/encode and /token-count
TokensBody = create_model("TokensBody", tokens=(TokenList, ...))  # /v1/internal/decode: read with vocab_size


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def completion_response(cid: str, model: str, jobs, prompt_tokens: int, echo_text: str = "",
                        text_of=None) -> dict:
    """`text_of` (token id -> its text) when the request asked for logprobs."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "text": echo_text + job.text, "finish_reason": job.finish_reason,
                         "logprobs": logprobs.openai(logprobs.shown(job), text_of, len(echo_text))
                         if text_of else None} for i, job in enumerate(jobs)],
            "usage": usage(jobs, prompt_tokens)}


def usage(jobs, prompt_tokens: int) -> dict:
    completion = sum(len(j.token_ids) for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chunk(cid: str, model: str, index: int, text: str, reason: str | None = None,
          token_logprobs: dict | None = None) -> dict:
    """One streamed piece; `token_logprobs` (logprobs.openai) covers the tokens that made it."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": token_logprobs}]}


def models_response(service) -> dict:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                        "owned_by": "cfg-textgen"}]}


def model_info_response(service) -> dict:
    return {"model_name": service.model_name, "lora_names": [],
            "loader": "llama.cpp" if service.backend_name == "llama.cpp" else "Transformers"}
