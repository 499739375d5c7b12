"""Chunked prefill in the one decode loop (lanes.DecodeLoop) on the llama.cpp backend: a joining
prompt is read `prefill_chunk` tokens per step between the running lanes' steps, so they keep
producing tokens; a cancel during the read frees the slots at the next step; the chunked read gives
the logits of a read in one piece (deterministic mode: micro-batches of 32 round alike)."""

from __future__ import annotations

import dataclasses

import pytest

from llamacpp_reference import DETERMINISTIC, default_gguf

CHUNK = 16
SHORT = "Once upon a time, the knight rode"
LONG = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, "
        "lit the lamp and wrote one line in the log: nothing. ") * 6


@pytest.fixture(scope="module")
def backend():
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(default_gguf(), DETERMINISTIC.replace(batch_size=CHUNK), n_ctx=512, pairs=2)
    yield b
    b.close()


class _Lane:
    """A lane the test cancels by hand."""

    def __new__(cls, state):
        from cfg_textgen.lanes import Lane

        class Cancellable(Lane):
            stop = False

            @property
            def cancelled(self):
                return self.stop

        return Cancellable(state)


def _reads(prompt_tokens: int) -> int:
    """Decodes a prompt of that many tokens (both rows) takes in chunks of CHUNK: pieces of CHUNK
    until the rest fits one decode, which also outputs the logits."""
    return max(0, -(-(prompt_tokens - CHUNK) // CHUNK)) + 1


def _gen(backend, story, tokens, scale=1.0):
    from cfg_textgen.generation import Generation

    return Generation(backend, None, story, scale=scale, max_new_tokens=tokens, do_sample=False,
                      cache_prompt=False)


def _greedy_alone(backend, story_ids, opposing, tokens):
    """Greedy tokens with the prompt read in one decode (`run(new=...)`), nothing else running."""
    from cfg_textgen.guidance import cfg_combine

    [pair] = backend.prefill([(story_ids, opposing)])
    out = []
    try:
        for _ in range(tokens):
            logits = pair.logits
            scores = cfg_combine(logits[:1], logits[1:2], 1.5) if pair.cfg else logits[:1]
            out.append(int(scores.argmax()))
            backend.step([(pair, out[-1])])
    finally:
        backend.release(pair)
    return out


def test_decode_loop_running_lane_keeps_producing_tokens_while_a_long_prompt_is_read(backend):
    from cfg_textgen.lanes import DecodeLoop

    loop = DecodeLoop(backend)
    # whole chunks, so the steps can be counted (the pacer's measured rule: test_prefill_pacer.py)
    loop.pacer.budget = lambda streaming: CHUNK
    running = _Lane(_gen(backend, SHORT, 200))
    loop.step([running])
    joining = _Lane(_gen(backend, LONG, 6, scale=1.5))
    story, opposing = joining.state.pair_ids()
    chunks = _reads(len(story) + len(opposing))
    assert chunks > 10
    before = len(running.state.token_ids)
    loop.step([joining])
    steps = 1
    while not joining.state.token_ids:
        loop.step()
        steps += 1
    assert steps == chunks
    # one token per step for the running lane, the read's steps included
    assert len(running.state.token_ids) - before == steps
    while not joining.ended:
        loop.step()
    assert joining.error is None
    # the chunked read gives the tokens a read in one piece gives
    assert joining.state.token_ids == _greedy_alone(backend, story, opposing, 6)
    loop.close()
    assert backend.free_slots == 4


def test_decode_loop_cancel_during_a_long_read_frees_the_slots_within_one_chunk(backend):
    from cfg_textgen.lanes import DecodeLoop

    loop = DecodeLoop(backend)
    running = _Lane(_gen(backend, SHORT, 200))
    loop.step([running])
    joining = _Lane(_gen(backend, LONG, 6, scale=1.5))
    loop.step([joining])
    loop.step()
    assert joining.prefilling and backend.free_slots == 1
    joining.stop = True
    read = backend.prefilled_tokens
    ended = loop.step()
    assert ended == [joining] and joining.reason == "cancelled"
    assert backend.prefilled_tokens - read <= 1  # the running lane's step only: no chunk of the prompt
    assert backend.free_slots == 3 and backend.used_cells == len(running.pair.slots[0].tokens)
    loop.close()
    assert backend.free_slots == 4 and backend.used_cells == 0


def test_scheduler_streams_keep_flowing_while_another_long_prompt_is_read(backend):
    """Through the server's Scheduler (its own thread): a running job gains a token in each step
    that reads a piece of the joining job's prompt."""
    from cfg_textgen.presets import parse_preset
    from cfg_textgen.scheduler import Request, Scheduler

    preset = parse_preset({"name": "t", "samplers": [], "do_sample": False, "max_new_tokens": 400})
    with Scheduler(backend, max_parallel=2) as sched:
        running = sched.submit(Request(SHORT, preset, cache_prompt=False))
        pieces = running.pieces()
        next(pieces)
        at_submit = len(running.token_ids)
        joining = sched.submit(Request(LONG, dataclasses.replace(preset, max_new_tokens=2), cache_prompt=False))
        chunks = _reads(len(backend.tokenize(LONG)))
        assert joining.wait(120) and joining.error is None
        # the joining job's first token came after `chunks` steps, in each of which the running job stepped
        assert len(running.token_ids) - at_submit >= chunks - 1
        running.cancel()
        assert running.wait(60)
    assert backend.free_slots == 4
