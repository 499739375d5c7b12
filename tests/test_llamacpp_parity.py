"""The llama.cpp backend and the transformers path on the SAME GGUF.

transformers (`models.load_default()`) dequantizes the Q4_1 weights to float32 and multiplies in
float32; llama.cpp keeps the 4-bit weights and quantizes the activations to 8 bits for its dot
products (and keeps the KV cache in float16). They are two approximations of one model, so they
are not expected to agree bit for bit: this test REPORTS how far apart they are (run with -s for
the table; the same figures are in every assertion message) and asserts loose bounds set from
the measurement with a margin. Measured here: top-1 agreement ~0.9 of the steps teacher-forced,
expected |log-prob difference| under transformers' distribution ~0.065 per step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamacpp_reference import DETERMINISTIC, default_gguf, first_difference, have_llama_cpp, log_softmax64

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")]

TEXT = (
    "The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the one "
    "hundred and twelve stairs, lit the lamp, and wrote the same line in the logbook: no vessels "
    "sighted, weather fair or foul. His name was Tobias Renn, and he had been sent to the island "
    "of Carrow by a harbour board that no longer answered his letters. The supply boat still came "
    "on the first Monday of each month, crewed by a silent girl who left crates of flour, lamp oil "
    "and tinned peaches on the jetty and rowed away before he could reach the bottom of the path. "
    "He had stopped waving to her in the third year. In the seventh year he had started leaving "
    "notes under a stone, asking about the mainland, the war, the price of tobacco, and whether "
    "anyone remembered that the light was still burning. The notes were always gone when he came "
    "back, but no answer ever came in their place. On the night of the great storm, when the waves "
    "broke over the lower gallery and the glass of the lantern room sang in its frame, Tobias saw "
    "a light moving on the water where no light should be.")
N_TEACHER = 200

STORIES = [
    "Once upon a time, in a kingdom by the sea, there lived a princess who could not sleep.",
    "The detective lit a cigarette and stared at the body on the kitchen floor. \"Nobody touched",
    "Mira had been walking through the desert for three days when she found the well. It was",
    "The spaceship's engines went silent at exactly midnight, and Captain Okafor knew",
    "Grandmother's recipe book smelled of cinnamon and old paper. On the first page, in faded ink,",
]
GREEDY = 32

# bounds from the measurement, with a margin (see the module docstring)
MIN_TOP1 = 0.80
MAX_EXPECTED = 0.15  # mean over steps of E_p |d log p|
MAX_TOP_TOKEN = 1.0  # |d log p| of transformers' top-1 token, any step
TIE = 0.5  # a greedy divergence is accepted only where one side's top-2 gap is below this


@pytest.fixture(scope="module")
def both():
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.backends.transformers import TransformersBackend
    from cfg_textgen.models import load_default

    model, tokenizer = load_default()
    lcpp = LlamaCppBackend(default_gguf(), DETERMINISTIC, n_threads=1)
    yield lcpp, TransformersBackend(model, tokenizer), model
    lcpp.close()


def test_llamacpp_tokenizes_like_transformers(both):
    lcpp, hf, _ = both
    for text in [TEXT, *STORIES, "Café déjà vu, naïve 🦊🐉✨\n\nChapter two\n\t\"Run!\""]:
        assert lcpp.tokenize(text) == hf.tokenize(text), text


def test_llamacpp_teacher_forced_matches_transformers(both):
    lcpp, _, model = both
    ids = lcpp.tokenize(TEXT)[:N_TEACHER]
    assert len(ids) == N_TEACHER
    # llama.cpp through our backend: the first token, then one step per token (teacher forcing)
    [pair] = lcpp.prefill([(ids[:1], None)])
    rows = [pair.logits[0].numpy().copy()]
    for t in ids[1:]:
        rows.append(lcpp.step([(pair, t)])[0][0].numpy().copy())
    lcpp.release(pair)
    ll = log_softmax64(np.array(rows))
    with torch.no_grad():
        hl = log_softmax64(model(torch.tensor([ids])).logits[0].double().numpy())
    d = np.abs(ll - hl)
    p = np.exp(hl)
    top1_l, top1_h = ll.argmax(-1), hl.argmax(-1)
    agree = top1_l == top1_h
    expected = (p * d).sum(-1)
    top_tok = d[np.arange(len(ids)), top1_h]
    srt = np.sort(hl, -1)
    gap_h = srt[:, -1] - srt[:, -2]
    lines = [f"{'steps':>9} {'top-1 agree':>11} {'max|dlogp|':>10} {'E_p|dlogp|':>10} {'|dlogp| top-1':>13}"]
    for a in range(0, len(ids), 25):
        s = slice(a, a + 25)
        lines.append(f"{a:>4}-{min(a + 25, len(ids)) - 1:<4} {agree[s].mean():>11.2f} {d[s].max():>10.3f} "
                     f"{expected[s].mean():>10.4f} {top_tok[s].max():>13.3f}")
    lines.append(f"{'all':>9} {agree.mean():>11.3f} {d.max():>10.3f} {expected.mean():>10.4f} "
                 f"{top_tok.max():>13.3f}")
    dis = np.flatnonzero(~agree)
    lines.append("top-1 disagreements at steps " + ", ".join(
        f"{k} (transformers top-2 gap {gap_h[k]:.2f})" for k in dis))
    table = "\n".join(lines)
    print("\nllama.cpp (our backend) vs transformers, teacher-forced over "
          f"{len(ids)} tokens, log-probs:\n{table}")
    assert agree.mean() >= MIN_TOP1, table
    assert expected.mean() <= MAX_EXPECTED, table
    assert top_tok.max() <= MAX_TOP_TOKEN, table


class Record:
    def __init__(self):
        self.gaps: list[float] = []

    def __call__(self, ids, scores):
        top = torch.topk(scores[0].float(), 2).values
        self.gaps.append(float(top[0] - top[1]))
        return scores


def greedy(backend, story):
    from cfg_textgen.engine import Stream

    rec = Record()
    stream = Stream(backend, None, story, scale=1.0, chain=[rec], max_new_tokens=GREEDY,
                    do_sample=False, ban_eos=True)
    for _ in stream:
        pass
    return list(stream.token_ids), rec.gaps


def test_llamacpp_greedy_matches_transformers(both):
    lcpp, hf, _ = both
    lines, bad = [], []
    for story in STORIES:
        ids = lcpp.tokenize(story)
        a, gaps_a = greedy(lcpp, ids)
        b, gaps_b = greedy(hf, ids)
        k = first_difference(a, b)
        if k is None:
            lines.append(f"equal for all {GREEDY} tokens: {story[:40]!r}")
            continue
        line = (f"part at token {k} (llama.cpp top-2 gap {gaps_a[k]:.3f}, transformers {gaps_b[k]:.3f}): "
                f"{story[:40]!r} -> llama.cpp {lcpp.tokenizer.decode(a[:k + 1])!r} / transformers "
                f"{lcpp.tokenizer.decode(b[:k + 1])!r}")
        lines.append(line)
        if min(gaps_a[k], gaps_b[k]) >= TIE:
            bad.append(line)
    report = "\n".join(lines)
    print(f"\ngreedy, {GREEDY} tokens, EOS banned, llama.cpp vs transformers:\n{report}")
    # Measured: only 1 of the 5 stories stays equal for 32 tokens; the others part at tokens 2,
    # 11, 21 and 31, each where one side's two best tokens are 0.01-0.29 apart in log-prob, within
    # the ~0.1-0.3 the two paths differ on top tokens (teacher-forced test above). So the issue's
    # "equal for at least the first 32 tokens" does not hold for quantized llama.cpp vs float32
    # transformers; what holds, and is asserted, is that they part only at such near ties.
    assert not bad, "a divergence that is not a near tie:\n" + report
