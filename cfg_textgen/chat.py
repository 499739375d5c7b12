"""Chat messages -> the prompt text, with the model's own chat template, rendered as transformers does.

The template is the GGUF's `tokenizer.chat_template` metadata on llama.cpp, the tokenizer's
`chat_template` on transformers. It is rendered with jinja2 the way transformers'
`apply_chat_template` renders it (`utils/chat_template_utils.py`): a sandboxed environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception(message)`, a
`tojson` filter that keeps non-ASCII text, `strftime_now(format)`, the `generation` block tag,
`tools` and `documents` as none, and the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) as variables; `add_generation_prompt=True` ends the text
where the assistant's reply begins. The rendered text carries its own special tokens, so it is
tokenized without adding any (as `apply_chat_template(tokenize=True)` does).

A model without a template gets ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), what
llama.cpp's server falls back to.
"""

from __future__ import annotations

import ctypes
import json
from datetime import datetime
from functools import lru_cache

from .errors import CFGTextgenError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatTemplateError(CFGTextgenError):
    """The template refused the messages (its raise_exception) or failed to render them."""


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]) under `template`."""
    import jinja2

    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"the model's chat template refused the messages: {err}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ChatTemplateError(f"the model's chat template could not render the messages: {err}") from None


def _gguf_string(backend, key: str) -> str | None:
    """A string value of the GGUF's metadata (llama.cpp's `llama_model_meta_val_str`), or None."""
    L = backend.lib
    size = 1 << 16
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_model_meta_val_str(backend.model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1
    return None


def template_of(backend) -> tuple[str, dict[str, str]]:
    """(the model's chat template or ChatML, its special tokens as the template sees them)."""
    if backend.name == "llama.cpp":
        template = _gguf_string(backend, "tokenizer.chat_template")
        special = {}
        for name, token in (("bos_token", backend.bos_id), ("eos_token", backend.tokenizer.eos_token_id)):
            if token is not None:
                special[name] = backend.piece_bytes(int(token), special=True).decode("utf-8", "replace")
    else:
        tok = backend.tokenizer
        template = getattr(tok, "chat_template", None)
        template = template if isinstance(template, str) else None  # a dict of named templates: not used
        special = {k: v for k, v in getattr(tok, "special_tokens_map", {}).items() if isinstance(v, str)}
    return template or CHATML, special
