"""The llama.cpp backend's prompt cache: a released pair's tokens stay in the KV cache and a new
pair decodes only what follows the longest matching prefix. Checked against a cold read of the same
prompt by a backend with the cache off, on the default model; with micro-batches of 32 tokens
(`n_ubatch=32`) and the deterministic mode every read rounds like token-by-token decoding, so a
warm read must give the cold logits exactly, and a stale cached token would show. `write --interactive`
keeps one backend for its turns, so its second turn reads only the new text."""

from __future__ import annotations

import pytest
import torch

from llamacpp_reference import DETERMINISTIC, default_gguf

STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, "
         "lit the lamp and wrote one line in the log: nothing.") * 2
# default micro-batches (512): a warm read differs from a cold one by the rounding of llama.cpp's
# large-batch kernels (the generated tokens were decoded one by one, a cold read reads them in one
# batch). Measured on the default model, a 64-token story + 5 generated + 4 new tokens: max
# |d logit| 0.59; the bound leaves room for other CPUs' kernels
DEFAULT_UBATCH_BOUND = 1.5


def _backend(cache: bool = True, n_ubatch: int | None = None, pairs: int = 2):
    """The default model in the deterministic mode (micro-batches of 32 unless `n_ubatch`)."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(default_gguf(), DETERMINISTIC.replace(cache_prompt=cache), n_ctx=256,
                           pairs=pairs, n_ubatch=n_ubatch)


@pytest.fixture(scope="module")
def warm():
    b = _backend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def cold():
    b = _backend(cache=False)
    yield b
    b.close()


def _read(backend, story, opposing=None, cache=True):
    """(the pair's first logits, prompt tokens the backend decoded for it); the pair is released."""
    before = backend.prefilled_tokens
    pair = backend.open((story, opposing), cache=cache)
    while pair.pending:
        backend.feed(pair, None)
    logits = pair.logits.clone()
    backend.release(pair)
    return logits, backend.prefilled_tokens - before


def _turn_one(backend, story, opposing, tokens=5):
    """A first turn: the story read, `tokens` greedy tokens generated; the tokens."""
    [pair] = backend.prefill([(story, opposing)])
    out = []
    for _ in range(tokens):
        out.append(int(pair.logits[0].argmax()))
        backend.step([(pair, out[-1])])
    backend.release(pair)
    return out


def test_prompt_cache_turn_two_reads_only_the_new_tokens_and_equals_a_cold_read(warm, cold):
    story = warm.tokenize(STORY)
    opposing = [warm.bos_id]
    generated = _turn_one(warm, story, opposing)
    turn2 = story + generated + warm.tokenize(" The sea was calm", add_special=False)
    logits, read = _read(warm, turn2, opposing)
    new = len(turn2) - len(story) - len(generated)
    # the story's new tokens (the generated ones were all fed, so cached); the blank opposing
    # prompt is its BOS again (a prompt's last token is always read: its logits are the pair's)
    assert read == new + 1
    cold_logits, cold_read = _read(cold, turn2, opposing)
    assert cold_read == len(turn2) + 1
    assert torch.equal(logits, cold_logits)


def test_prompt_cache_changed_word_mid_story_rereads_from_there_and_serves_no_stale_token(warm, cold):
    story = warm.tokenize(STORY)
    _read(warm, story, None)
    at = 3 * len(story) // 4  # past half the story: the cached slot is still the best match
    changed = list(story)
    changed[at] = warm.tokenize(" storm", add_special=False)[0]
    assert changed[at] != story[at]
    logits, read = _read(warm, changed, None)
    assert read == len(changed) - at
    cold_logits, _ = _read(cold, changed, None)
    assert torch.equal(logits, cold_logits)
    stale, _ = _read(cold, story, None)  # what a cache that kept the old word would give
    assert not torch.allclose(logits, stale, atol=1e-3)


def test_prompt_cache_off_per_pair_rereads_the_whole_prompt(warm):
    story = warm.tokenize(STORY)
    _read(warm, story, None)
    _, read = _read(warm, story, None, cache=False)
    assert read == len(story)
    _, read = _read(warm, story, None)
    assert read == 1  # only the last token, whose logits are the pair's


def test_prompt_cache_opposing_prompt_reuses_its_own_cached_sequence(warm, cold):
    """SillyTavern's negative prompt: the story with a line inserted near its end. Each row finds its
    own cached sequence (the story does not take the opposing one, nor the other way round)."""
    story = warm.tokenize(STORY)
    at = len(story) - 6
    opposing = story[:at] + warm.tokenize(" [Style: dull]", add_special=False) + story[at:]
    generated = _turn_one(warm, story, opposing)
    more = warm.tokenize(" Far away", add_special=False)
    logits, read = _read(warm, story + generated + more, opposing + generated + more)
    assert read == 2 * len(more)
    cold_logits, _ = _read(cold, story + generated + more, opposing + generated + more)
    assert torch.equal(logits, cold_logits)


LONG_STORY = STORY * 3  # longer than COPY_MIN, so that taking the cells pays


def _negative(backend, story, depth=12):
    """SillyTavern's negative prompt: the story with one line inserted `depth` tokens from its end."""
    at = len(story) - depth
    return story[:at] + backend.tokenize(" [Style: cheerful, careless]", add_special=False) + story[at:]


@pytest.mark.parametrize("budget", [None, 48], ids=["whole", "pieces"])
def test_prompt_cache_negative_prompt_takes_the_storys_cells_instead_of_reading_them(cold, budget):
    """Turn 1 with a negative prompt that repeats the story: the shared tokens are read once (the
    story's), the negative row takes their cells (llama_memory_seq_cp) and reads only from its
    inserted line on; its logits are a cold read's, bit for bit."""
    from cfg_textgen.backends.llama_cpp import COPY_MIN

    b = _backend(pairs=1)
    try:
        story = b.tokenize(LONG_STORY)
        opposing = _negative(b, story)
        shared = len(story) - 12
        assert shared > COPY_MIN
        pair = b.open((story, opposing))
        while pair.pending:
            b.feed(pair, budget)
        logits = pair.logits.clone()
        assert b.prefilled_tokens == len(story) + len(opposing) - shared
        assert pair.cached_rows == [0, shared]
        b.release(pair)
        cold_logits, cold_read = _read(cold, story, opposing)
        assert cold_read == len(story) + len(opposing)
        assert torch.equal(logits, cold_logits)
    finally:
        b.close()


def test_prompt_cache_second_request_takes_a_running_requests_cells(cold):
    """The same story sent again while the first request still runs (two users, a regenerate): the
    second pair takes the live pair's cells and reads only its own last tokens."""
    b = _backend(pairs=2)
    try:
        story = b.tokenize(LONG_STORY)
        [first] = b.prefill([(story, None)])
        b.step([(first, int(first.logits[0].argmax()))])  # it runs on
        more = b.tokenize(" The sea", add_special=False)
        logits, read = _read(b, story + more, None)
        assert read == len(more)  # the new tokens (the last of them read for its logits)
        assert torch.equal(logits, _read(cold, story + more, None)[0])
        b.release(first)
    finally:
        b.close()


def test_prompt_cache_off_takes_no_other_requests_cells():
    b = _backend(pairs=2)
    try:
        story = b.tokenize(LONG_STORY)
        [first] = b.prefill([(story, None)])
        opposing = _negative(b, story)
        _, read = _read(b, story, opposing, cache=False)
        assert read == len(story) + len(opposing) and b.copied_tokens == 0
        b.release(first)
    finally:
        b.close()


def test_prompt_cache_story_does_not_take_the_negative_prompts_slot_through_a_context_shift():
    """A negative prompt with its line inserted EARLY (SillyTavern at a small depth, or a short
    story): with context shift on, the last turn's negative slot also holds the new story after a
    hole, as many tokens as the story's own slot. The rows are placed together, so each still
    finds its own and turn 2 reads only the new tokens of both."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.runtime import RuntimeSettings

    b = LlamaCppBackend(default_gguf(), RuntimeSettings(), n_ctx=256, pairs=2)
    try:
        assert b.context_shift
        story = b.tokenize(STORY)
        line = b.tokenize(" [Style: dull]", add_special=False)
        opposing = story[:6] + line + story[6:]
        _read(b, story, opposing)
        more = b.tokenize(" Far away", add_special=False)
        assert _read(b, story + more, opposing + more)[1] == 2 * len(more)
    finally:
        b.close()


def test_prompt_cache_new_story_takes_the_least_recently_used_slot_not_another_users():
    """Three users' stories on 4 single-row slots: a new story takes a never-used slot, then the
    least recently used one, and every user's next turn still finds its own cache."""
    b = _backend(pairs=2)
    try:
        stories = [b.tokenize(f"Story {name}: " + STORY) for name in ("one", "two", "three")]
        for s in stories[:2]:
            _read(b, s, None)
        for s in stories[:2]:  # each finds its own slot: only the one new token is read
            assert _read(b, s + [s[5]], None)[1] == 1
        _read(b, stories[2], None)  # a never-used slot
        assert b.cached_cells == sum(len(s) for s in stories) + 2
        for s in stories:
            assert _read(b, s + [s[5], s[6]], None)[1] <= 2  # a lost slot would read it all
    finally:
        b.close()


def test_prompt_cache_warm_read_with_default_micro_batches_stays_within_the_stated_bound():
    b, c = _backend(n_ubatch=512), _backend(cache=False, n_ubatch=512)
    try:
        story = b.tokenize(STORY)
        generated = _turn_one(b, story, None)
        turn2 = story + generated + b.tokenize(" The sea was calm", add_special=False)
        logits, read = _read(b, turn2, None)
        assert read < 10
        cold_logits, _ = _read(c, turn2, None)
        diff = (logits - cold_logits).abs().max().item()
        assert diff <= DEFAULT_UBATCH_BOUND, diff
        assert logits.argmax() == cold_logits.argmax()
    finally:
        b.close()
        c.close()


def test_llama_rewind_takes_tokens_back_from_the_cache_and_the_records(warm, cold):
    story = warm.tokenize(STORY)
    [pair] = warm.prefill([(story, [warm.bos_id])])
    first = int(pair.logits[0].argmax())
    [after_one] = warm.step([(pair, first)])
    after_one = after_one.clone()
    warm.step([(pair, 7)])
    warm.step([(pair, 8)])
    warm.rewind(pair, 3)  # back to the prompt alone
    assert pair.next_pos == [len(story), 1]
    [again] = warm.step([(pair, first)])
    assert torch.equal(again, after_one)
    warm.release(pair)
    # the slot holds story + [first]: 7 and 8 are read again (records that kept them would not)
    logits, read = _read(warm, story + [first, 7, 8], [warm.bos_id])
    assert read == 2 + 1
    assert torch.equal(logits, _read(cold, story + [first, 7, 8], [warm.bos_id])[0])


# context shift: the kept tokens' cells were computed with the dropped ones in view, so the next-token
# distribution is not a fresh read's. Measured on the default model (memory + a 180-token story
# whose first 20/40/60 tokens are dropped): KL(fresh || shifted) 0.0007 / 0.0035 / 0.0095 nats, the
# same top token, max |d logit| up to 4.3 (in the far tail); dropping 100 of the 180 gave KL 0.11.
# Bound, for a drop of up to a third of the story: KL <= 0.05 and the same top token.
SHIFT_KL_BOUND = 0.05
MEMORY = "[Memory: Ada is a lighthouse keeper on a cold northern island.]\n"
DAYS = " ".join(f"On day {i} the sea was grey and the lamp burned until dawn." for i in range(30))


@pytest.mark.parametrize("drop", [20, 60])
def test_context_shift_keeps_the_story_after_the_dropped_tokens_within_the_stated_bound(drop):
    """A story that outgrew the window: next turn it keeps BOS and the memory block, loses its
    oldest `drop` tokens and gains 12. Only the 12 are read; the cells after the dropped tokens move
    down to close the hole."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.runtime import RuntimeSettings

    b = LlamaCppBackend(default_gguf(), RuntimeSettings(), n_ctx=256, pairs=1)
    c = LlamaCppBackend(default_gguf(), RuntimeSettings(cache_prompt=False), n_ctx=256, pairs=1)
    try:
        assert b.context_shift
        memory, text = b.tokenize(MEMORY, add_special=False), b.tokenize(DAYS, add_special=False)
        front = [b.bos_id] + memory
        _read(b, front + text[:180], None)
        turn2 = front + text[drop:192]
        logits, read = _read(b, turn2, None)
        assert read == 12 and b.shifted_tokens == drop
        slot = max(b._slots, key=lambda s: s.used_at)
        assert slot.tokens == turn2
        assert b.lib.llama_memory_seq_pos_max(b.memory, slot.seq) == len(turn2) - 1  # positions closed up
        fresh, _ = _read(c, turn2, None)
        p, q = torch.log_softmax(fresh.double(), -1), torch.log_softmax(logits.double(), -1)
        kl = (p.exp() * (p - q)).sum().item()
        assert kl <= SHIFT_KL_BOUND, kl
        assert logits.argmax() == fresh.argmax()
    finally:
        b.close()
        c.close()


def test_context_shift_is_off_in_the_deterministic_mode(warm):
    """There the text must not depend on what the cache held: the story after the prefix is read."""
    assert not warm.context_shift
    memory, text = warm.tokenize(MEMORY, add_special=False), warm.tokenize(DAYS, add_special=False)
    front = [warm.bos_id] + memory
    _read(warm, front + text[:180], None)
    _, read = _read(warm, front + text[20:192], None)
    assert read >= 172 and warm.shifted_tokens == 0  # the story after BOS + memory at least


def test_prompt_cache_write_interactive_turn_two_reads_only_the_new_text_and_equals_a_cold_run(
        tmp_path, monkeypatch):
    """`write --interactive`: a continuation, then a typed line and a second continuation, on the one
    backend the command loaded. Turn 2 reads the typed text, the last generated token (sampled, never
    fed: turn 1 ended on it) and the blank opposing prompt's BOS (a row's last token is always read:
    its logits are the pair's), nothing of the story before; its greedy text is a cold run's."""
    from click.testing import CliRunner

    from cfg_textgen import cli
    from cfg_textgen.models import load_backend
    from cfg_textgen.runtime import RuntimeSettings

    runs = []  # (Stream, preset, the backend's prompt tokens read before it)
    factory = cli._stream_factory

    def recording_factory(backend, generator):
        make = factory(backend, generator)

        def made(prompt, preset):
            runs.append((make(prompt, preset), preset, backend.prefilled_tokens))
            return runs[-1][0]
        return made

    monkeypatch.setattr(cli, "_stream_factory", recording_factory)
    path = tmp_path / "story.txt"
    path.write_text("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the "
                    "stairs and", encoding="utf-8")
    # one thread: quick on a busy machine; the cold run below uses the same settings
    r = CliRunner().invoke(cli.main, ["write", str(path), "--interactive", "--deterministic", "--threads", "1",
                                      "--preset", "greedy", "--tokens", "8", "--cfg-scale", "1.5"],
                           input="The sea was calm.\n/quit\n")
    assert r.exit_code == 0, r.output
    (one, preset, before_one), (two, _, before_two) = runs
    backend = one.backend
    try:
        assert two.backend is backend and one.stop_reason == "max_tokens"
        # the file's text, read again, gives turn 1's tokens: turn 2 is them + the typed line
        seen = len(one.prompt_ids) + len(one.token_ids)
        assert two.prompt_ids[:seen] == one.prompt_ids + one.token_ids
        typed = two.prompt_ids[seen:]
        assert typed and backend.tokenizer.decode(typed).strip() == "The sea was calm."
        assert before_two - before_one == len(one.prompt_ids) + 1  # turn 1: cold, story + opposing BOS
        assert backend.prefilled_tokens - before_two == len(typed) + 1 + 1
        cold = load_backend(None, "llama.cpp", runtime=RuntimeSettings(deterministic=True, threads=1,
                                                                       cache_prompt=False))
        try:
            again = cli._stream_factory(cold, None)(two.prompt_ids, preset)
            text = "".join(again)
            assert cold.prefilled_tokens == len(two.prompt_ids) + 1
            assert again.token_ids == two.token_ids and text == two.text and text
        finally:
            cold.close()
    finally:
        backend.close()
