"""OpenAI's chat completions (`POST /v1/chat/completions`): the request envelope and response shapes.

The messages are rendered with the model's own chat template (chat.py) and decoded like a
completion: every sampler field of /v1/completions applies (translate.py, the web UI's names),
with `n`, `seed`, `stop`, `stream`, and `logprobs` / `top_logprobs` in OpenAI chat's shape
(server/logprobs.py). CFG: `guidance_scale` with `negative_prompt` (an opposing
prompt as plain text, as on /v1/completions) or `negative_messages` (our extension: an opposing
conversation in the same shape as `messages`, rendered with the same template, so that the two
branches differ only where the conversations do). Content may be a string or OpenAI's list of
text parts (joined); other parts (images, audio) are refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import Field

from ..chat import ChatTemplateError
from . import logprobs
from .bodies import Count, Flag, Int, read
from .errors import APIError, bad
from .translate import WEBUI_FLAVOUR, build_preset, check_request_grammar
from .webui import DEFAULT_MAX_TOKENS, MAX_LOGPROBS, NULLABLE, ChoicesBody, usage

CHAT_NULLABLE = NULLABLE | {"max_completion_tokens", "stream_options", "negative_messages", "response_format",
                            "tools", "tool_choice", "parallel_tool_calls", "top_logprobs"}


class ChatBody(ChoicesBody):
    """POST /v1/chat/completions' envelope; `messages` and `negative_messages` are checked by
    `messages_of`."""

    LENGTH_FIELDS = ("max_completion_tokens", *ChoicesBody.LENGTH_FIELDS)  # OpenAI's newer name wins
    messages: Any = None
    negative_messages: Any = None
    max_completion_tokens: Count = None
    logprobs: Flag = False  # OpenAI chat's: each token's log-prob, with `top_logprobs` alternatives
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] = None

    @property
    def alternatives(self) -> int | None:
        """How many alternatives to record per token; None: no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None


def messages_of(field: str, value) -> list[dict]:
    """A conversation as the template sees it: a non-empty list of {"role": str, "content": str, ...};
    content as text parts is joined, a null content is "" (an assistant turn with tool calls)."""
    if not isinstance(value, list) or not value:
        raise bad(field, 'must be a non-empty list of messages like {"role": "user", "content": "..."}', value)
    out = []
    for i, m in enumerate(value):
        where = f"`{field}[{i}]`"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f'{where} must be an object with a string "role", but is {m!r:.80}', field)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported "
                                    '([{"type": "text", "text": "..."}])', field)
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts, but is {content!r:.80}",
                           field)
        out.append({**m, "content": content})
    return out


def parse_chat(body: dict, service) -> tuple[ChatBody, object, list[int], list[int] | None]:
    """(envelope, Preset, prompt token ids, opposing token ids or None)."""
    body = {k: v for k, v in body.items() if not (v is None and k in CHAT_NULLABLE)}
    c = read(ChatBody, body)
    if "messages" not in body:
        raise APIError(400, "`messages` is required", "messages")
    if c.top_logprobs is not None and not c.logprobs:  # OpenAI's rule
        raise APIError(400, "`top_logprobs` needs `logprobs`: true", "top_logprobs")
    messages = messages_of("messages", c.messages)
    max_new = c.max_completion_tokens or c.max_tokens or c.max_new_tokens or DEFAULT_MAX_TOKENS
    if max_new >= service.n_ctx:
        raise APIError(400, f"`{c.length_field}` is {max_new}, but the model's context window is {service.n_ctx} "
                            f"tokens (prompt included): ask for fewer", c.length_field)
    if c.negative_messages is not None and body.get("negative_prompt"):
        raise APIError(400, "give `negative_prompt` (text) or `negative_messages` (a conversation), not both",
                       "negative_messages")
    preset, c._skipped = build_preset(body, WEBUI_FLAVOUR, max_new, c.stop + c.stopping_strings, c.preset, None,
                                      defaults=service.defaults, vocab_size=service.vocab_size)
    check_request_grammar(service, preset, body, ("grammar_string", "grammar"))
    prompt = _rendered(service, "messages", messages)
    opposing = None
    if c.negative_messages is not None:
        opposing = _rendered(service, "negative_messages", messages_of("negative_messages", c.negative_messages))
    return c, preset, prompt, opposing


def _rendered(service, field: str, messages: list[dict]) -> list[int]:
    try:
        return service.chat_prompt(messages)
    except ChatTemplateError as err:
        raise APIError(400, f"`{field}`: {err}", field) from None


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chat_response(cid: str, model: str, jobs, prompt_tokens: int, token_logprobs=None) -> dict:
    """`token_logprobs(entries)` (logprobs.chat's shape) when the request asked for log-probs."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": job.text},
                         "finish_reason": job.finish_reason,
                         "logprobs": token_logprobs(logprobs.shown(job)) if token_logprobs else None}
                        for i, job in enumerate(jobs)],
            "usage": usage(jobs, prompt_tokens)}


def chat_chunk(cid: str, model: str, index: int, delta: dict, reason: str | None = None,
               token_logprobs: dict | None = None) -> dict:
    """One streamed piece; `token_logprobs` (logprobs.chat) covers the tokens that made it."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": token_logprobs}]}
