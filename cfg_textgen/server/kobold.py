"""The KoboldAI API as KoboldCpp serves it (koboldcpp.py, kcpp_docs.embd): envelope and shapes.

`/api/v1/generate` answers {"results": [{"text", "finish_reason", ...}]}; `/api/extra/generate/
stream` sends SSE `event: message` / `data: {"token": ..., "finish_reason": ...}` and a last event
with an empty token and the finish reason. A request names itself with `genkey` so that
`/api/extra/abort` can end it. CFG comes as `guidance_scale` / `negative_prompt`, our extension
(SillyTavern sends them to KoboldCpp too). Sampler fields go to translate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import APIError, Fields
from .translate import KOBOLD_FLAVOUR, build_preset, check_prompt

DEFAULT_MAX_LENGTH = 200  # KoboldCpp's default for a request without max_length
VERSION = "1.82"  # the KoboldCpp API level these routes follow (Kobold Lite gates features on it)


@dataclass
class Generate:
    prompt: str
    preset: object
    seed: int | None
    ban_eos: bool
    genkey: str | None
    truncate: bool


def parse_generate(body: dict, service) -> Generate:
    f = Fields(body)
    prompt = check_prompt(body.get("prompt"), allow_ids=False)
    max_new = f.int("max_length", lo=1)
    if max_new is None:
        max_new = DEFAULT_MAX_LENGTH
    if max_new >= service.n_ctx:
        raise APIError(400, f"`max_length` is {max_new}, but the model's context window is "
                            f"{service.n_ctx} tokens (prompt included): ask for fewer", "max_length")
    context = f.int("max_context_length", lo=1)
    seed = f.int("sampler_seed")
    if seed is not None and seed < 0:
        seed = None
    stop = f.strings("stop_sequence")
    ban_eos = bool(f.bool("ban_eos_token")) or bool(f.bool("bypass_eos"))
    f.bool("trim_stop")  # checked; stop strings are always trimmed
    genkey = f.str("genkey")
    truncate = f.bool("truncate")
    preset = build_preset(body, KOBOLD_FLAVOUR, max_new, stop)
    return Generate(service.fit(prompt, context, max_new), preset, seed, ban_eos, genkey,
                    truncate is not False)


def finish_reason(job) -> str:
    return "length" if job.stop_reason == "max_tokens" else "stop"


def generate_response(job, prompt_tokens: int) -> dict:
    return {"results": [{"text": job.text, "finish_reason": finish_reason(job), "logprobs": None,
                         "prompt_tokens": prompt_tokens, "completion_tokens": len(job.token_ids)}]}


def version_response(protected: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("cfg-textgen")
    except PackageNotFoundError:
        ours = "unknown"
    return {"result": "KoboldCpp", "version": VERSION, "protected": protected, "txt2img": False,
            "vision": False, "audio": False, "transcribe": False, "multiplayer": False, "websearch": False,
            "tts": False, "embeddings": False, "server": "cfg-textgen", "server_version": ours}
