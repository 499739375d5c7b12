"""Three rules every way of generating shares (engine, analysis, CLI, server): what fits the
model's context window, which tokens end a story, and which token begins one (BOS).

- The context cut works per row: the story row and the opposing row are separate rows of the batch
  (separate KV caches, positions from 0), so each needs only its own length plus the new tokens to
  fit the window. The most recent tokens are kept, and leading special tokens (BOS) stay in front.
- A story ends at any of: generation_config's EOS (what `generate` stops at), the model config's
  EOS, the tokenizer's EOS, and the tokenizer's end-of-document token. The last matters for chat
  models: SmolLM2-Instruct's generation_config ends turns at `<|im_end|>`, while a story written with
  it ends at `<|endoftext|>`, which the model emits at the end of a text; without it the engine
  would write on past the end of the document.
- BOS is the model config's `bos_token_id` (what the model was trained with), else the tokenizer's.
"""

from __future__ import annotations

from typing import Sequence

from .errors import ContextError

# The names models use for "end of document" (GPT-2/SmolLM/Qwen, Llama 3, SentencePiece, Gemma).
# Only taken when the tokenizer has it as a special token.
END_OF_DOCUMENT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def context_length(model) -> int | None:
    """The model's window in tokens (max_position_embeddings), or None if it does not say."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_context(ids: Sequence[int], window: int | None, new_tokens: int, special_ids=(),
                what: str = "the story") -> list[int]:
    """The most recent tokens of one row that leave room for `new_tokens` in `window` (None: no
    limit), with the row's leading special tokens (BOS) kept in front. Only this row's own length
    counts: the other rows of a batch have their own positions and cache."""
    ids = [int(t) for t in ids]
    if window is None:
        return ids
    budget = window - new_tokens
    if budget < 1:
        raise ContextError(f"{new_tokens} new tokens leave no room for {what} in this model's context "
                           f"of {window} tokens: ask for fewer tokens", field="max_new_tokens",
                           rule=f"less than {window}", value=new_tokens)
    if len(ids) <= budget:
        return ids
    special = set(special_ids)
    head = []
    while len(head) < len(ids) and ids[len(head)] in special and len(head) < budget - 1:
        head.append(ids[len(head)])
    return head + ids[len(ids) - (budget - len(head)):]


def fit_with_memory(memory: Sequence[int], story: Sequence[int], window: int, new_tokens: int,
                    special_ids=()) -> list[int]:
    """Memory in front of the story, both fitted to `window` with room for `new_tokens`, as
    KoboldCpp does with a request's `memory` (gpttype_adapter.cpp, `gpttype_generate`): the memory
    is kept whole unless it alone leaves fewer than 4 free tokens (then its most recent tokens, its
    BOS in front), the story's leading special tokens (BOS) go (the memory brings its own), and
    the story keeps its most recent tokens in the room left, possibly none."""
    special = set(special_ids)
    memory, story = [int(t) for t in memory], [int(t) for t in story]
    if len(memory) + new_tokens + 4 > window:
        memory = fit_context(memory, window - 4, new_tokens, special_ids, what="the memory")
    while story and story[0] in special:
        story = story[1:]
    room = max(0, window - new_tokens - len(memory))
    return memory + (story[len(story) - room:] if room else [])


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value if v is not None}
    return {int(value)}


def eos_ids(model, tokenizer=None) -> set[int]:
    """Every id that ends a story (see the module docstring)."""
    ids = _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids |= _ids(getattr(model.config, "eos_token_id", None))
    if tokenizer is not None:
        ids |= _ids(getattr(tokenizer, "eos_token_id", None))
        special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        for name in END_OF_DOCUMENT:
            if name in special:  # a real special token (SmolLM2's is also its unk token, by name)
                token_id = tokenizer.convert_tokens_to_ids(name)
                if isinstance(token_id, int):
                    ids.add(token_id)
    return ids


def bos_id(model, tokenizer=None) -> int | None:
    """The id a blank story starts with (see the module docstring), or None if neither says."""
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if bos is None and tokenizer is not None:
        bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)
