"""The KoboldAI API as KoboldCpp serves it (koboldcpp.py, kcpp_docs.embd): envelope and shapes.

`/api/v1/generate` answers {"results": [{"text", "finish_reason", ...}]}; `/api/extra/generate/
stream` sends SSE `event: message` / `data: {"token": ..., "finish_reason": ...}` and a last event
with an empty token and the finish reason. A request names itself with `genkey` so that
`/api/extra/abort` can end it. CFG comes as `guidance_scale` / `negative_prompt`, our extension
(SillyTavern sends them to KoboldCpp too). Sampler fields go to translate.py.
"""

from __future__ import annotations

import time

from pydantic import create_model

from ..errors import CFGTextgenError
from . import logprobs
from .bodies import Count, Envelope, Flag, Seed, Stops, Text, TextPrompt, read
from .errors import APIError
from .translate import KOBOLD_FLAVOUR, build_preset, check_request_grammar

DEFAULT_MAX_LENGTH = 200  # KoboldCpp's default for a request without max_length
VERSION = "1.82"  # the KoboldCpp API level these routes follow (Kobold Lite gates features on it)


class GenerateBody(Envelope):
    """The envelope of POST /api/v1/generate and /api/extra/generate/stream. A field may be left
    out but not sent as null. Unknown keys are ignored: Kobold Lite sends many we do not use."""

    prompt: TextPrompt
    max_length: Count = DEFAULT_MAX_LENGTH
    max_context_length: Count = None
    sampler_seed: Seed = None
    stop_sequence: Stops = []
    ban_eos_token: Flag = None  # None: not sent (then use_default_badwordsids decides)
    use_default_badwordsids: Flag = False  # Kobold Lite's Story mode: ban EOS, as KoboldCpp reads it
    bypass_eos: Flag = False
    memory: Text = ""  # memory, instruct system prompt and world info (Kobold Lite): kept in front
    trim_stop: Flag = True  # checked; stop strings are always trimmed
    genkey: Text = None
    truncate: Flag = True
    logprobs: Flag = False  # KoboldCpp: each token's log-prob and its best alternatives in the result

    @property
    def bans_eos(self) -> bool:
        """KoboldCpp (koboldcpp.py): `use_default_badwordsids` stands for `ban_eos_token` when that
        is not sent; `bypass_eos` (EOS does not end the text) is served as a ban here."""
        ban = self.use_default_badwordsids if self.ban_eos_token is None else self.ban_eos_token
        return ban or self.bypass_eos


def parse_generate(body: dict, service) -> tuple[GenerateBody, object]:
    """The request's envelope (its prompt fitted to the window) and its Preset."""
    g = read(GenerateBody, body)
    if g.max_length >= service.n_ctx:
        raise APIError(400, f"`max_length` is {g.max_length}, but the model's context window is "
                            f"{service.n_ctx} tokens (prompt included): ask for fewer", "max_length")
    preset, g._skipped = build_preset(body, KOBOLD_FLAVOUR, g.max_length, g.stop_sequence,
                                  defaults=service.defaults, vocab_size=service.vocab_size)
    check_request_grammar(service, preset, body, ("grammar",))
    if g.memory:
        try:
            g.prompt = service.fit_memory(g.memory, g.prompt, g.max_context_length, g.max_length)
        except CFGTextgenError as err:
            raise APIError(400, f"`max_length`: {err}", "max_length") from None
    else:
        g.prompt = service.fit(g.prompt, g.max_context_length, g.max_length)
    return g, preset


# /api/extra/abort ends the generation named by `genkey` (all of this API's when null or absent);
# /api/extra/generate/check and /api/extra/last_logprobs ask about the one named by `genkey`
AbortBody = create_model("AbortBody", genkey=(Text | None, None))
TokenCountBody = create_model("TokenCountBody", prompt=(Text, ...))  # /api/extra/tokencount


def logprobs_of(job, service) -> dict | None:
    """KoboldCpp's logprobs object for a job that recorded them (`logprobs: true`), else None."""
    if job is None or job.generation.logprobs is None:
        return None
    return logprobs.kobold(logprobs.shown(job), service.token_text)


def generate_response(job, prompt_tokens: int, service) -> dict:
    return {"results": [{"text": job.text, "finish_reason": job.finish_reason,
                         "logprobs": logprobs_of(job, service),
                         "prompt_tokens": prompt_tokens, "completion_tokens": len(job.token_ids)}]}


# KoboldCpp's stop_reason numbers (/api/extra/perf): -1 invalid (none yet; here also cancelled or
# failed), 0 out of tokens (max_length), 1 EOS, 2 a stop sequence
STOP_REASON = {"max_tokens": 0, "eos": 1, "stop": 2}


def perf_response(service) -> dict:
    """/api/extra/perf as KoboldCpp answers it: the last generation's prompt processing and
    generation seconds, its token count, seed and stop reason; requests queued (waiting, not
    running), idle (1: nothing running), uptime, and seconds since the last request (idletime)."""
    last = service.last_finished()
    stats = last.stats if last is not None else None
    process = (stats.first_token_seconds or 0.0) if stats else 0.0
    now = time.time()
    running = service.running()
    return {"last_process": process, "last_eval": max(0.0, stats.seconds - process) if stats else 0.0,
            "last_token_count": len(last.token_ids) if last else 0,
            "last_seed": getattr(last, "seed", 0) if last else 0, "total_gens": service.total,
            "stop_reason": STOP_REASON.get(last.stop_reason, -1) if last else -1, "total_img_gens": 0,
            "queue": service.waiting(), "idle": int(running == 0), "hordeexitcounter": 0,
            "uptime": now - service.started, "idletime": now - service.last_request,
            "quiet": False, "backend": service.backend_name}


def version_response(protected: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("cfg-textgen")
    except PackageNotFoundError:
        ours = "unknown"
    return {"result": "KoboldCpp", "version": VERSION, "protected": protected, "txt2img": False,
            "vision": False, "audio": False, "transcribe": False, "multiplayer": False, "websearch": False,
            "tts": False, "embeddings": False, "server": "cfg-textgen", "server_version": ours}
