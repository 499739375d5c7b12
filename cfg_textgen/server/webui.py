"""text-generation-webui's OpenAI-compatible API (modules/api/): request envelope and response shapes.

Fields and defaults follow the web UI's typing.py: `max_tokens` 16 (`max_new_tokens` is the web
UI's name for it; `max_tokens` wins when both are sent, as SillyTavern sends both), `n` 1, `seed`
-1 (random), `stop` plus the web UI's `stopping_strings`. The OpenAI fields may be null (the
web UI types them Optional); null means "not given". Sampler fields go to translate.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import APIError, Fields
from .translate import KOBOLD_FLAVOUR, build_preset, check_prompt, flavour_of_completion

NULLABLE = frozenset({"model", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
                      "n", "presence_penalty", "stop", "stream", "suffix", "temperature", "top_p", "user", "seed"})
DEFAULT_MAX_TOKENS = 16
MAX_N = 8  # choices per request: each is a whole generation


@dataclass
class Completion:
    prompt: str | list[int]
    preset: object
    n: int
    seed: int | None
    stream: bool
    echo: bool
    ban_eos: bool
    truncate: bool


def parse_completion(body: dict, service) -> Completion:
    body = {k: v for k, v in body.items() if not (v is None and k in NULLABLE)}
    f = Fields(body, NULLABLE)
    prompt = check_prompt(body.get("prompt"))
    max_new = f.int("max_tokens", lo=1)
    name = "max_tokens"
    if max_new is None:
        max_new, name = f.int("max_new_tokens", lo=1), "max_new_tokens"
    if max_new is None:
        max_new = DEFAULT_MAX_TOKENS
    if max_new >= service.n_ctx:
        raise APIError(400, f"`{name}` is {max_new}, but the model's context window is {service.n_ctx} "
                            f"tokens (prompt included): ask for fewer", name)
    n = f.int("n", lo=1, hi=MAX_N) or 1
    seed = f.int("seed")
    if seed is not None and seed < 0:
        seed = None  # the web UI's -1: random
    stop = f.strings("stop") + f.strings("stopping_strings")
    stream = bool(f.bool("stream"))
    echo = bool(f.bool("echo"))
    ban_eos = bool(f.bool("ban_eos_token"))
    truncate = f.bool("truncate")
    context = f.int("truncation_length", lo=0)
    add_bos = f.bool("add_bos_token")
    preset_name = f.str("preset")
    if add_bos is False and isinstance(prompt, str):
        prompt = service.tokenize(prompt, special=False) or prompt
    flavour = flavour_of_completion(body)
    renames = {"max_length": "max_tokens"} if flavour == KOBOLD_FLAVOUR else None
    preset = build_preset(body, flavour, max_new, stop, preset_name if flavour != KOBOLD_FLAVOUR else None,
                          renames)
    prompt = service.fit(prompt, context, max_new)
    return Completion(prompt, preset, n, seed, stream, echo, ban_eos, truncate is not False)


def finish_reason(job) -> str:
    return "length" if job.stop_reason == "max_tokens" else "stop"


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def completion_response(cid: str, model: str, jobs, prompt_tokens: int, echo_text: str = "") -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "text": echo_text + job.text, "finish_reason": finish_reason(job),
                         "logprobs": None} for i, job in enumerate(jobs)],
            "usage": usage(jobs, prompt_tokens)}


def usage(jobs, prompt_tokens: int) -> dict:
    completion = sum(len(j.token_ids) for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chunk(cid: str, model: str, index: int, text: str, reason: str | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}


def models_response(service) -> dict:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                        "owned_by": "cfg-textgen"}]}


def model_info_response(service) -> dict:
    return {"model_name": service.model_name, "lora_names": [],
            "loader": "llama.cpp" if service.backend_name == "llama.cpp" else "Transformers"}
