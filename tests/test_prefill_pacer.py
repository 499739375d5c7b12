"""lanes.PrefillPacer: the prompt tokens a step may read, from the measured step and token times
(values worked out by hand from its rule: share * step / token, between one token and the
backend's chunk)."""

from __future__ import annotations

from cfg_textgen.lanes import PrefillPacer


def test_prefill_pacer_reads_the_whole_chunk_when_nothing_else_streams():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)
    pacer.read(64, 0.64)
    assert pacer.budget(streaming=False) == 512


def test_prefill_pacer_first_piece_beside_streams_is_small():
    assert PrefillPacer(512).budget(streaming=True) == 16
    assert PrefillPacer(8).budget(streaming=True) == 8  # never above the backend's chunk


def test_prefill_pacer_budget_is_a_step_of_prompt_tokens():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)  # a step of the running lanes: 100 ms
    pacer.read(100, 0.1)  # a prompt token: 1 ms -> 100 / 1 = 100 tokens
    assert pacer.budget(streaming=True) == 100
    slow = PrefillPacer(512)
    slow.stepped(0.36)  # three CFG streams of a 1B model on 2 cores
    slow.read(16, 16 * 0.11)  # 110 ms a token, 2,000 tokens into a story: 3.27 -> 3 tokens
    assert slow.budget(streaming=True) == 3
    slower = PrefillPacer(512)
    slower.stepped(0.1)
    slower.read(2, 0.5)  # a token takes longer than a step: still one token a step
    assert slower.budget(streaming=True) == 1
    fast = PrefillPacer(512)
    fast.stepped(0.1)
    fast.read(1000, 0.1)  # 0.1 ms a token: 1,000 tokens fit -> the chunk
    assert fast.budget(streaming=True) == 512


def test_prefill_pacer_share_scales_the_piece():
    pacer = PrefillPacer(512, share=2.0)
    pacer.stepped(0.1)
    pacer.read(100, 0.1)  # 2 * 100 ms / 1 ms
    assert pacer.budget(streaming=True) == 200


def test_prefill_pacer_averages_its_measurements():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)
    pacer.stepped(0.2)  # 0.1 + 0.3 * (0.2 - 0.1)
    assert abs(pacer.step_s - 0.13) < 1e-12
    pacer.read(0, 5.0)  # a read of no token says nothing about a token's time
    assert pacer.token_s is None
