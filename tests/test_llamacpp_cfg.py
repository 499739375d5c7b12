"""The llama.cpp backend against independent references.

The references live in tests/llamacpp_reference.py and use llama-cpp-python's low-level API only:
nothing of cfg_textgen.backends is in them.

Why two tolerances (measured on the default model, SmolLM2-135M Q4_1, CPU):
llama.cpp's CPU matmuls round differently once a micro-batch holds 64 tokens or more (logits
bit-identical for any split into micro-batches of <= 63 tokens; up to ~0.8 apart, ~0.1 in a typical
log-prob, from 64 on: activations are quantized and multiplied by another kernel). So
- with `n_ubatch=32` on both sides every token goes through the same kernels, whatever the
  batching, and the backend's raw logits must equal the brute-force reference's BIT FOR BIT; the
  guided log-probs then differ only by the float32 combine (ours) vs the float64 one (the
  reference's): measured <= 4.2e-5 (scale 3), bound 1e-4;
- with the default `n_ubatch=512` the backend prefills a long prompt with the large-batch kernels
  and decodes each step with the small ones, while the from-scratch reference decodes the whole
  sequence with the large ones: the differences are kernel rounding, not CFG, and are bounded by
  what was measured (see LOOSE_* below).
"""

from __future__ import annotations

import numpy as np
import pytest

from llamacpp_reference import (DETERMINISTIC, LlamaRef, exact_pair, brute_force_cfg, default_gguf, first_difference,
                                have_llama_cpp, log_softmax64)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")]

THREADS = 1  # 2 llama.cpp threads on 2 cores shared with other processes spin-wait for minutes
STEPS = 32
SCALES = (0.0, 0.5, 1.5, 3.0)
OPPOSING = ("", "The weather report for Tuesday, in a flat voice.")
# short, so that 32 brute-force steps (64 full re-decodes) take seconds
SHORT_STORY = "The dragon folded her wings over the sleeping village, and the old baker looked up"
LONG_STORY = (
    "The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the one "
    "hundred and twelve stairs, lit the lamp, and wrote the same line in the logbook: no vessels "
    "sighted, weather fair or foul. His name was Tobias Renn, and he had been sent to the island "
    "of Carrow by a harbour board that no longer answered his letters.")

EXACT_LOGPROB = 1e-4  # float32 combine vs float64; measured <= 4.2e-5 (scale 3), both guided forms
# default n_ubatch: measured max |d log-prob| 1.18 over the whole vocabulary (its far tail),
# expected |d| under the guided distribution <= 0.15 per step; bounds with a margin
LOOSE_MAX = 2.5
LOOSE_EXPECTED = 0.3


class Tap:
    """Our backend, with every logits view it hands out copied (rows in pair order)."""

    def __init__(self, backend):
        self._b = backend
        self.logits: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self._b, name)

    def run(self, steps=(), new=()):
        outs, pairs = self._b.run(steps=steps, new=new)
        for t in list(outs) + [p.logits for p in pairs]:
            self.logits.append(t.numpy().copy())
        return outs, pairs

    def feed(self, pair, budget):
        """The decode loop's prompt read: the pair's logits once its prompt is all read."""
        n = self._b.feed(pair, budget)
        if not pair.pending:
            self.logits.append(pair.logits.numpy().copy())
        return n

    def prefill(self, pairs):
        return self.run(new=pairs)[1]

    def step(self, tokens):
        return self.run(steps=tokens)[0]


class Record:
    """Last in the chain: the scores the engine's sampler chain received (after CFG, EOS ban)."""

    def __init__(self):
        self.rows: list[np.ndarray] = []

    def __call__(self, ids, scores):
        self.rows.append(scores[0].double().numpy().copy())
        return scores


@pytest.fixture(scope="module")
def exact():
    """Our backend and the reference, both with micro-batches of 32 tokens (same kernels)."""
    with exact_pair(THREADS) as pair:
        yield pair


@pytest.fixture(scope="module")
def default():
    """Our backend and the reference with llama.cpp's usual 512-token micro-batches."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    ref = LlamaRef(n_threads=THREADS)
    backend = LlamaCppBackend(default_gguf(), DETERMINISTIC, n_threads=THREADS, n_ubatch=512)
    yield backend, ref
    backend.close()
    ref.close()


def run_engine(backend, story, scale, opposing, steps):
    """Greedy through our engine; (tokens, scores seen by the chain, raw logits per decode)."""
    from cfg_textgen.engine import Stream

    tap, rec = Tap(backend), Record()
    stream = Stream(tap, None, story, scale=scale, opposing_prompt=opposing, chain=[rec],
                    max_new_tokens=steps, do_sample=False, ban_eos=True)
    for _ in stream:
        pass
    return list(stream.token_ids), np.array(rec.rows), tap.logits


def masked_diff(a, b, allowed):
    """max |a - b| over the tokens finite in both (our chain saw EOS banned: -inf)."""
    keep = np.isfinite(a) & np.isfinite(b) & allowed
    return float(np.abs(np.where(keep, a - b, 0.0)).max())


def compare_guided(ours, trace, eog):
    """Max difference of our chain's scores from the reference's, in the form ours matches
    (u + s(c - u), or the lead's c_raw + (s - 1)(c - u): they differ by a per-row constant)."""
    allowed = np.ones(ours.shape[-1], dtype=bool)
    allowed[eog] = False
    d_lp = max(masked_diff(o, g, allowed) for o, g in zip(ours, trace.guided_lp))
    d_raw = max(masked_diff(o, g, allowed) for o, g in zip(ours, trace.guided))
    return (d_lp, "u + s(c - u)") if d_lp <= d_raw else (d_raw, "c_raw + (s - 1)(c - u)")


@pytest.mark.parametrize("opposing", OPPOSING, ids=["blank", "text"])
@pytest.mark.parametrize("scale", SCALES)
def test_llamacpp_cfg_equals_brute_force_reference(exact, scale, opposing):
    """Check 1: our engine on llama.cpp = CFG that re-decodes both sequences from scratch."""
    backend, ref = exact
    story = ref.tokenize(SHORT_STORY)
    opp_ids = ref.tokenize(opposing) if opposing else [ref.bos_id]
    tokens, ours, raw = run_engine(backend, story, scale, opposing, STEPS)
    assert len(tokens) == STEPS
    # the reference along OUR tokens (teacher forcing), then its own greedy path
    trace = brute_force_cfg(ref, story, opp_ids, scale, STEPS, ban=ref.eog_ids, forced=tokens)
    # raw logits, bit for bit: row 0 story, row 1 opposing, per step (scale != 1: two rows)
    raw_story = np.array([r[0] for r in raw])
    raw_opp = np.array([r[1] for r in raw])
    c_ref = np.array(trace.c_raw, dtype=np.float32)
    u_ref = np.array([ref.last_logits(list(opp_ids) + tokens[:k]) for k in range(STEPS)])
    d_c = float(np.abs(raw_story - c_ref).max())
    d_u = float(np.abs(raw_opp - u_ref).max())
    d_guided, form = compare_guided(ours, trace, ref.eog_ids)
    report = (f"scale {scale}, opposing {opposing!r}, {STEPS} steps: max |logit diff| story {d_c:.3g}, "
              f"opposing {d_u:.3g}; max |guided diff| {d_guided:.3g} (form {form}), bound {EXACT_LOGPROB}")
    print("\n" + report)
    assert d_c == 0.0 and d_u == 0.0, "logits are not bit-identical with the same kernels: " + report
    assert d_guided <= EXACT_LOGPROB, report
    # each of our tokens is the reference's argmax (a near-tie within the bound may go either way)
    for k, (tok, g) in enumerate(zip(tokens, trace.guided_lp)):
        g = g.copy()
        g[ref.eog_ids] = -np.inf
        assert g[tok] >= g.max() - 2 * EXACT_LOGPROB, f"step {k}: token {tok} is not the argmax; " + report
    own = brute_force_cfg(ref, story, opp_ids, scale, STEPS, ban=ref.eog_ids).tokens
    assert own == tokens, f"greedy paths part at step {first_difference(own, tokens)}; " + report


@pytest.mark.parametrize("opposing", OPPOSING, ids=["blank", "text"])
def test_llamacpp_cfg_default_ubatch_within_kernel_rounding(default, opposing):
    """Check 1 with llama.cpp's default micro-batch: the large-batch kernels round the prompt
    differently from token-by-token steps; the difference stays within what was measured."""
    backend, ref = default
    story = ref.tokenize(LONG_STORY)
    assert len(story) >= 64, "the story must be long enough for llama.cpp's large-batch kernels"
    opp_ids = ref.tokenize(opposing) if opposing else [ref.bos_id]
    steps, scale = 16, 1.5
    tokens, ours, _ = run_engine(backend, story, scale, opposing, steps)
    trace = brute_force_cfg(ref, story, opp_ids, scale, steps, ban=ref.eog_ids, forced=tokens)
    d_guided, form = compare_guided(ours, trace, ref.eog_ids)
    # expected |difference| of the guided log-probs under the guided distribution, per step
    expected = []
    for o, g in zip(ours, trace.guided_lp):
        g = g.copy()
        g[ref.eog_ids] = -np.inf
        p = np.exp(log_softmax64(g))
        o = log_softmax64(np.where(np.isfinite(o), o, -np.inf))
        keep = p > 0
        expected.append(float((p[keep] * np.abs(o[keep] - log_softmax64(g)[keep])).sum()))
    own = brute_force_cfg(ref, story, opp_ids, scale, steps, ban=ref.eog_ids)
    k = first_difference(own.tokens, tokens)
    report = (f"default n_ubatch, scale {scale}, opposing {opposing!r}, {steps} steps: max |guided "
              f"diff| {d_guided:.3g} (form {form}, bound {LOOSE_MAX}); expected |diff| per step max "
              f"{max(expected):.3g} (bound {LOOSE_EXPECTED}); greedy paths "
              + ("equal" if k is None else f"part at step {k} (reference top-2 gap there "
                                            f"{own.gaps[k]:.3g})"))
    print("\n" + report)
    assert d_guided <= LOOSE_MAX, report
    assert max(expected) <= LOOSE_EXPECTED, report
