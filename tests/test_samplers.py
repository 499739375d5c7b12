"""Samplers against hand-computed values from their formulas, the preset contract, constructor
validation and the final pick. Differential tests against transformers live in
test_samplers_reference.py, property tests over every sampler in test_samplers_properties.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cfg_textgen.samplers import SAMPLERS, Sampler, pick_token

INF = float("inf")


def logits(*probs):
    """A (1, V) row of logits whose softmax is `probs` (0 -> -inf)."""
    return torch.tensor([[math.log(p) if p > 0 else -INF for p in probs]])


def kept(out):
    """Indices of the finite entries of a (1, V) row."""
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


class CharTokenizer:
    """Just enough of a tokenizer for DRY: one id per character, ':' -> 5, '\\n' -> 6."""

    table = {"a": 0, ":": 5, "\n": 6}

    def encode(self, text, add_special_tokens=False):
        return [self.table.get(c, 9) for c in text]


# ---- the preset contract (docs/preset-format.md, transcribed by hand) -------------------------

CONTRACT = {
    "temperature": {"temperature": (1.0, "a float > 0")},
    "dynamic_temperature": {"low": (1.0, "a float >= 0"), "high": (1.0, "a float >= 0"),
                            "exponent": (1.0, "a float > 0")},
    "top_k": {"k": (0, "an integer >= 0")},
    "top_p": {"p": (1.0, "a float in (0, 1]")},
    "typical": {"p": (1.0, "a float in (0, 1]")},
    "min_p": {"p": (0.0, "a float in [0, 1]")},
    "top_a": {"a": (0.0, "a float in [0, 1]")},
    "tfs": {"z": (1.0, "a float in (0, 1]")},
    "epsilon": {"epsilon": (0.0, "a float in [0, 1)")},
    "eta": {"eta": (0.0, "a float in [0, 1)")},
    "repetition_penalty": {"penalty": (1.0, "a float > 0"), "range": (0, "an integer >= 0"),
                           "slope": (0.0, "a float >= 0"), "slope_mode": ("curve", "one of 'curve', 'halves'"),
                           "presence": (0.0, "a finite float"),
                           "frequency": (0.0, "a finite float"),
                           "whitelist": ((), "a list of integers >= 0")},
    "no_repeat_ngram": {"size": (0, "an integer >= 0")},
    "mirostat": {"version": (2, "one of 1, 2"), "tau": (5.0, "a float > 0"), "eta": (0.1, "a float > 0")},
    "unified": {"linear": (1.0, "a finite float"), "quad": (0.0, "a finite float"),
                "conf": (0.0, "a finite float")},
    "xtc": {"threshold": (0.1, "a float in [0, 1]"), "probability": (0.0, "a float in [0, 1]"),
            "protect_newline_eos": (True, "a boolean")},
    "dry": {"multiplier": (0.0, "a float >= 0"), "base": (1.75, "a float >= 1"),
            "allowed_length": (2, "an integer >= 1"), "range": (0, "an integer >= 0"),
            "sequence_breakers": (("\n", ":", '"', "*"), "a list of strings")},
    "top_n_sigma": {"n": (0.0, "a float >= 0")},
    "logit_bias": {"bias": ({}, "a dict of token ids to finite floats"), "ban": ((), "a list of integers >= 0")},
    "adaptive_p": {"target": (-1.0, "a float <= 1"), "decay": (0.9, "a float in [0, 0.99]")},
    "quadratic": {"factor": (0.0, "a float >= 0"), "curve": (1.0, "a finite float")},
}


def test_registry_matches_the_preset_format():
    assert set(SAMPLERS) == set(CONTRACT)
    for name, cls in SAMPLERS.items():
        assert cls.name == name and issubclass(cls, Sampler)
        declared = {p.name: (p.default, p.rule()) for p in cls.params}
        assert declared == CONTRACT[name], name
        assert cls.__doc__ and "Args:" in cls.__doc__ and "Reference" in cls.__doc__, name


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_sampler_defaults_are_off(name):
    """Built from defaults (`off` in the preset table) every sampler but mirostat changes nothing."""
    if name == "mirostat":
        pytest.skip("mirostat has no neutral setting (the table says: remove it)")
    torch.manual_seed(0)
    scores = torch.randn(2, 30)
    ids = torch.randint(0, 30, (2, 12))
    out = SAMPLERS[name].from_params({}, tokenizer=CharTokenizer())(ids, scores)
    assert out is not scores
    torch.testing.assert_close(out.log_softmax(-1), scores.log_softmax(-1), atol=1e-6, rtol=0)


# ---- constructor validation -------------------------------------------------------------------

BAD = [
    ("temperature", {"temperature": 0.0}, "temperature"),
    ("temperature", {"temperature": -1}, "temperature"),
    ("temperature", {"temperature": "hot"}, "temperature"),
    ("temperature", {"temperature": float("nan")}, "temperature"),
    ("dynamic_temperature", {"low": -0.1}, "low"),
    ("dynamic_temperature", {"high": -1.0}, "high"),
    ("dynamic_temperature", {"exponent": 0.0}, "exponent"),
    ("top_k", {"k": -1}, "k"),
    ("top_k", {"k": 2.5}, "k"),
    ("top_k", {"k": True}, "k"),
    ("top_p", {"p": 0.0}, "p"),
    ("top_p", {"p": 1.5}, "p"),
    ("typical", {"p": 0.0}, "p"),
    ("typical", {"p": 1.01}, "p"),
    ("min_p", {"p": -0.01}, "p"),
    ("min_p", {"p": 1.01}, "p"),
    ("top_a", {"a": 1.5}, "a"),
    ("top_a", {"a": -0.5}, "a"),
    ("tfs", {"z": 0.0}, "z"),
    ("tfs", {"z": 2.0}, "z"),
    ("epsilon", {"epsilon": 1.0}, "epsilon"),
    ("epsilon", {"epsilon": -0.1}, "epsilon"),
    ("eta", {"eta": 1.0}, "eta"),
    ("eta", {"eta": -1e-3}, "eta"),
    ("repetition_penalty", {"penalty": 0.0}, "penalty"),
    ("repetition_penalty", {"range": -5}, "range"),
    ("repetition_penalty", {"range": 1.5}, "range"),
    ("repetition_penalty", {"slope": -0.5}, "slope"),
    ("repetition_penalty", {"presence": float("inf")}, "presence"),
    ("repetition_penalty", {"frequency": None}, "frequency"),
    ("repetition_penalty", {"whitelist": [1, -2]}, "whitelist"),
    ("repetition_penalty", {"whitelist": "12"}, "whitelist"),
    ("no_repeat_ngram", {"size": -1}, "size"),
    ("mirostat", {"version": 3}, "version"),
    ("mirostat", {"version": 2.0}, "version"),
    ("mirostat", {"tau": 0.0}, "tau"),
    ("mirostat", {"eta": -0.1}, "eta"),
    ("unified", {"linear": float("nan")}, "linear"),
    ("unified", {"quad": "x"}, "quad"),
    ("unified", {"conf": float("-inf")}, "conf"),
    ("xtc", {"threshold": 1.5}, "threshold"),
    ("xtc", {"probability": -0.1}, "probability"),
    ("dry", {"multiplier": -1.0}, "multiplier"),
    ("dry", {"base": 0.5}, "base"),
    ("dry", {"allowed_length": 0}, "allowed_length"),
    ("dry", {"range": -1}, "range"),
    ("dry", {"sequence_breakers": [1, 2]}, "sequence_breakers"),
    ("dry", {"sequence_breakers": "\n"}, "sequence_breakers"),
    ("top_n_sigma", {"n": -1.0}, "n"),
    ("logit_bias", {"bias": {"x": 1.0}}, "bias"),
    ("logit_bias", {"bias": {3: float("inf")}}, "bias"),
    ("logit_bias", {"bias": [3, 1.0]}, "bias"),
    ("logit_bias", {"ban": [-1]}, "ban"),
    ("top_k", {"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
    ("top_p", {"min_tokens_to_keep": 1.0}, "min_tokens_to_keep"),
    ("dry", {"multiplier": 1.0, "tokenizer": None}, "tokenizer"),
]


@pytest.mark.parametrize("name,kwargs,param", BAD, ids=[f"{n}-{p}-{i}" for i, (n, _, p) in enumerate(BAD)])
def test_sampler_rejects_bad_values_naming_the_parameter(name, kwargs, param):
    kwargs = dict(kwargs)
    if SAMPLERS[name].needs_tokenizer and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = CharTokenizer()
    with pytest.raises(ValueError, match=f"`{param}`"):
        SAMPLERS[name](**kwargs)


def test_param_error_message_states_rule_and_value():
    with pytest.raises(ValueError, match=r"^`p` has to be a float in \(0, 1\], but is 1\.5$"):
        SAMPLERS["top_p"](p=1.5)


def test_param_check_accepts_integers_for_floats():
    assert SAMPLERS["temperature"](temperature=2).temperature == 2.0
    assert isinstance(SAMPLERS["temperature"](temperature=2).temperature, float)
    assert SAMPLERS["min_p"](p=1).p == 1.0 and isinstance(SAMPLERS["min_p"](p=1).p, float)  # was Param.check(1)


def test_from_params_fills_defaults_and_resolves_breakers_with_the_tokenizer():
    dry = SAMPLERS["dry"].from_params({"multiplier": 1.0, "sequence_breakers": [":", "\n"]},
                                      tokenizer=CharTokenizer())
    assert (dry.multiplier, dry.base, dry.allowed_length, dry.range) == (1.0, 1.75, 2, 0)
    assert dry.breaker_ids == {5, 6}
    assert SAMPLERS["top_p"].from_params({}).p == 1.0


# ---- tail-free sampling -----------------------------------------------------------------------

TFS_P = (.4, .2, .12, .08, .06, .05, .04, .03, .02)


def test_tfs_keeps_i_star_plus_one_tokens():
    # first differences: -.2 -.08 -.04 -.02 -.01 -.01 -.01 -.01
    # |second differences|: .12 .04 .02 .01 0 0 0  (sum .19)
    # normalised cumulative: .632 .842 .947 1 1 1 1 -> first index > 0.9 is i* = 2 -> keep 3
    out = SAMPLERS["tfs"](z=0.9)(None, logits(*TFS_P))
    assert kept(out) == [0, 1, 2]
    torch.testing.assert_close(out[0, :3], logits(*TFS_P)[0, :3])


def test_tfs_larger_z_keeps_more():
    # .947 <= 0.95 < 1 -> i* = 3 -> keep 4
    assert kept(SAMPLERS["tfs"](z=0.95)(None, logits(*TFS_P))) == [0, 1, 2, 3]
    # .632 > 0.5 -> i* = 0 -> keep 1
    assert kept(SAMPLERS["tfs"](z=0.5)(None, logits(*TFS_P))) == [0]


def test_tfs_order_of_vocab_does_not_matter():
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    out = SAMPLERS["tfs"](z=0.9)(None, logits(*TFS_P)[:, perm])
    assert sorted(perm[kept(out)].tolist()) == [0, 1, 2]


def test_tfs_without_curvature_keeps_everything():
    # a linear ramp has zero second differences: no tail to cut
    out = SAMPLERS["tfs"](z=0.5)(None, logits(.4, .3, .2, .1))
    assert kept(out) == [0, 1, 2, 3]


# ---- top-a, top-n-sigma -----------------------------------------------------------------------


@pytest.mark.parametrize("a,expected", [(0.5, [0, 1, 2]), (1.0, [0, 1]), (0.19, [0, 1, 2, 3])])
def test_top_a_keeps_probabilities_above_a_times_pmax_squared(a, expected):
    # p_max^2 = .25: a=.5 -> .125 (drops .05); a=1 -> .25 (drops .15 and .05); a=.19 -> .0475
    assert kept(SAMPLERS["top_a"](a=a)(None, logits(.5, .3, .15, .05))) == expected


def test_top_n_sigma_keeps_logits_within_n_std_of_max():
    scores = torch.tensor([[3.0, 2.0, 0.0, -1.0, -INF]])
    # finite logits 3, 2, 0, -1: mean 1, population variance (4+1+1+4)/4 = 2.5, sigma 1.5811
    # n=1: cut 1.419 -> {3, 2}; n=2: cut -0.162 -> {3, 2, 0}; n=3: cut -1.74 -> all four
    assert kept(SAMPLERS["top_n_sigma"](n=1.0)(None, scores)) == [0, 1]
    assert kept(SAMPLERS["top_n_sigma"](n=2.0)(None, scores)) == [0, 1, 2]
    assert kept(SAMPLERS["top_n_sigma"](n=3.0)(None, scores)) == [0, 1, 2, 3]


# ---- repetition penalty: range, slope, presence, frequency, whitelist -------------------------


def test_repetition_penalty_linear_slope_by_window_position():
    # window of R=5 distinct tokens 0..4, oldest first; slope 1: f = x = [-1, -.5, 0, .5, 1]
    # penalty 1 + (x+1)/2 * (2-1) = [1, 1.25, 1.5, 1.75, 2]
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    scores = torch.tensor([[2.0, 2.0, -2.0, 2.0, -2.0, 2.0]])
    out = SAMPLERS["repetition_penalty"](penalty=2.0, slope=1.0, range=5)(ids, scores)
    expected = torch.tensor([[2 / 1, 2 / 1.25, -2 * 1.5, 2 / 1.75, -2 * 2, 2.0]])
    torch.testing.assert_close(out, expected)


def test_repetition_penalty_steep_slope():
    # slope s=2: f = 2x / (1 + |x|); x=-.5 -> -2/3, x=.5 -> 2/3
    # penalty 3: 1 + (f+1)/2 * 2 = f + 2 -> [1, 4/3, 2, 8/3, 3]
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    scores = torch.full((1, 5), 4.0)
    out = SAMPLERS["repetition_penalty"](penalty=3.0, slope=2.0, range=5)(ids, scores)
    torch.testing.assert_close(out, 4.0 / torch.tensor([[1, 4 / 3, 2, 8 / 3, 3]]))


def test_repetition_penalty_uses_most_recent_position_and_range():
    # range 4 -> window [3, 1, 3, 2] (token 4 is outside); slope 1, R=4: x = -1, -1/3, 1/3, 1
    # penalties 1, 4/3, 5/3, 2 (theta 2); token 3 last at j=2 -> 5/3, token 1 at j=1 -> 4/3
    ids = torch.tensor([[4, 3, 1, 3, 2]])
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    out = SAMPLERS["repetition_penalty"](penalty=2.0, slope=1.0, range=4)(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[1.0, 3 / 4, 1 / 2, 3 / 5, 1.0]]))


def test_repetition_penalty_curve_is_built_over_the_range_not_the_window():
    # KoboldAI United modeling/warpers.py RepetitionPenalty.torch: the curve has rep_pen_range points,
    # x_j = j / (range - 1) * 2 - 1, f = s x / (1 + |x| (s - 1)), pen = 1 + (f + 1) / 2 * (rep_pen - 1),
    # and a shorter window takes its last values (`_penalty[..., -clipped_penalty_range:]`).
    # range 8, slope 1 (f = x), rep_pen 2; window of 3: j = 5, 6, 7 -> x = 3/7, 5/7, 1
    # pen = 1 + (x + 1) / 2 = 12/7, 13/7, 2; a positive score 1 becomes 1 / pen
    ids = torch.tensor([[0, 1, 2]])
    scores = torch.ones(1, 4)
    out = SAMPLERS["repetition_penalty"](penalty=2.0, slope=1.0, range=8)(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[7 / 12, 7 / 13, 1 / 2, 1.0]]))


def test_repetition_penalty_range_past_int64_is_the_curves_newest_end_without_a_warning():
    # a client's rep_pen_range of 1e30 (KoboldAI's curve over it: x_j = j / (range - 1) * 2 - 1);
    # the window's positions are all at its newest end, x -> 1, so every penalty is the full
    # rep_pen: a positive score 1 becomes 1 / 2 (it raised OverflowError, and slicing the window
    # by it printed a torch UserWarning on the server's stderr)
    ids = torch.tensor([[0, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for slope in (1.0, 0.5, 3.0):
            for far in (10**30, 10**308):  # 1e308: past float64's range once doubled
                out = SAMPLERS["repetition_penalty"](penalty=2.0, slope=slope, range=far)(ids, torch.ones(1, 4))
                torch.testing.assert_close(out, torch.tensor([[1 / 2, 1 / 2, 1.0, 1.0]]))


def test_repetition_penalty_curve_needs_a_range():
    # KoboldAI applies rep_pen_slope only `if cls.rep_pen_range > 0`: a slope without a range is an error
    with pytest.raises(ValueError, match="`slope` needs `range` > 0"):
        SAMPLERS["repetition_penalty"](penalty=1.2, slope=0.7)


def test_repetition_penalty_halves_is_koboldcpp_two_step_rule():
    # KoboldCpp gpttype_adapter.cpp sample_rep_pen: window of n = 5, split = n / 2 = 2;
    # tokens_far = positions 0, 1; tokens_near = positions 2..4; a token in near gets rep_pen, one only
    # in far gets rep_pen_reduced = 1 + (rep_pen - 1) * slope = 1 + 1 * 0.5 = 1.5 (rep_pen 2).
    # window [0, 1, 2, 3, 1]: token 0 only far -> 1.5; token 1 also near -> 2; tokens 2, 3 near -> 2
    ids = torch.tensor([[0, 1, 2, 3, 1]])
    scores = torch.tensor([[3.0, 3.0, -3.0, 3.0, 3.0]])
    out = SAMPLERS["repetition_penalty"](penalty=2.0, range=5, slope=0.5, slope_mode="halves")(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[3 / 1.5, 3 / 2, -3 * 2, 3 / 2, 3.0]]))
    # slope 1 is flat there (KoboldCpp's default), and a penalty <= 1 is never reduced
    flat = SAMPLERS["repetition_penalty"](penalty=2.0, range=5, slope=1.0, slope_mode="halves")(ids, scores)
    torch.testing.assert_close(flat, SAMPLERS["repetition_penalty"](penalty=2.0, range=5)(ids, scores))
    reward = SAMPLERS["repetition_penalty"](penalty=0.5, range=5, slope=0.5, slope_mode="halves")(ids, scores)
    torch.testing.assert_close(reward, torch.tensor([[6.0, 6.0, -1.5, 6.0, 3.0]]))


def test_repetition_penalty_halves_slope_outside_its_range_is_an_error():
    with pytest.raises(ValueError, match=r"`slope` has to be a float in \(0, 1\] with slope_mode 'halves'"):
        SAMPLERS["repetition_penalty"](penalty=1.2, range=64, slope=3.4, slope_mode="halves")


def test_repetition_penalty_flat_range():
    ids = torch.tensor([[0, 1, 2], [2, 2, 2]])
    scores = torch.tensor([[3.0, -3.0, 3.0], [3.0, -3.0, 3.0]])
    out = SAMPLERS["repetition_penalty"](penalty=1.5, range=2)(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[3.0, -4.5, 2.0], [3.0, -3.0, 2.0]]))


def test_repetition_penalty_presence_frequency_and_whitelist():
    ids = torch.tensor([[1, 1, 2, 3]])
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # token 1: -(0.5 + 2*0.25) = -1; token 2: -(0.5 + 0.25) = -0.75; token 3 whitelisted
    out = SAMPLERS["repetition_penalty"](presence=0.5, frequency=0.25, whitelist=[3])(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.25, 1.0]]))
    # with penalty 2 as well: multiplicative first, then additive
    both = SAMPLERS["repetition_penalty"](penalty=2.0, presence=0.5, frequency=0.25, whitelist=[3])
    out = both(ids, scores)
    torch.testing.assert_close(out, torch.tensor([[1.0, -0.5, -0.25, 1.0]]))


# ---- unified, dynamic temperature -------------------------------------------------------------


def test_unified_formula():
    # l = log [.5, .25, .25]; H = .5 ln2 + 2 * .25 * 2 ln2 = 1.5 ln2
    l1, l2, h = -math.log(2), -2 * math.log(2), 1.5 * math.log(2)
    linear, quad, conf = 0.8, 0.1, 0.5
    raw = [li * (linear + h * conf) - quad * li * li for li in (l1, l2, l2)]
    scores = logits(.5, .25, .25) + 7.0  # a shift changes nothing: it works on log_softmax
    out = SAMPLERS["unified"](linear=linear, quad=quad, conf=conf)(None, scores)
    torch.testing.assert_close(out, torch.tensor([raw]))


def test_unified_keeps_removed_tokens_removed_whatever_the_signs():
    scores = logits(.5, .5, 0)
    out = SAMPLERS["unified"](linear=-1.0, quad=-2.0, conf=0.0)(None, scores)
    # l = -ln2 for both: raw = -ln2 * -1 + 2 ln2^2
    r = math.log(2) + 2 * math.log(2) ** 2
    torch.testing.assert_close(out, torch.tensor([[r, r, -INF]]))


def test_dynamic_temperature_formula():
    # row 0: p = [.5, .25, .25], H = 1.5 ln2, V = 3: T = .5 + (1.5 - .5) * (1.5 ln2 / ln3)^2
    # row 1: p = [.5, .5, 0], H = ln2, V = 2 finite candidates: H / log V = 1 -> T = high
    scores = torch.cat([logits(.5, .25, .25), logits(.5, .5, 0)])
    t0 = 0.5 + 1.0 * (1.5 * math.log(2) / math.log(3)) ** 2
    out = SAMPLERS["dynamic_temperature"](low=0.5, high=1.5, exponent=2.0)(None, scores)
    torch.testing.assert_close(out[0], scores[0] / t0)
    torch.testing.assert_close(out[1], scores[1] / 1.5)


def test_dynamic_temperature_single_candidate_gets_low():
    scores = torch.tensor([[2.0, -INF, -INF]])
    out = SAMPLERS["dynamic_temperature"](low=0.5, high=2.0)(None, scores)
    torch.testing.assert_close(out, torch.tensor([[4.0, -INF, -INF]]))


def test_temperature_divides():
    out = SAMPLERS["temperature"](temperature=0.5)(None, torch.tensor([[1.0, -2.0, -INF]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, -4.0, -INF]]))


def test_temperature_tiny_value_is_greedy_without_nan():
    out = SAMPLERS["temperature"](temperature=1e-40)(None, torch.tensor([[1.0, 3.0, -2.0]]))
    assert not out.isnan().any()
    assert out.softmax(-1).tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("t, row", [
    (0.5, [3e38, 1.0, -INF]),        # an ordinary t, a finite logit near the float32 limit
    (0.5, [-3e38, 1.0, -INF]),       # ... and a very negative one: it must not become "removed"
    (1e-50, [0.0, 0.0, -INF]),       # a t that rounds to 0 in float32 on an all-zero row
])
def test_temperature_never_turns_a_finite_logit_into_inf_or_nan(t, row):
    """The cheap pre-check in `_divide` (skip the overflow repair when max |x| / t fits) must
    send exactly these rows to the repair: finite in, finite out, -inf stays -inf."""
    scores = torch.tensor([row])
    out = SAMPLERS["temperature"](temperature=t)(None, scores)
    assert torch.isfinite(out[0, :2]).all() and out[0, 2] == -INF
    assert out[0, :2].argmax() == scores[0, :2].argmax()


# ---- XTC ----------------------------------------------------------------------------------------


def test_xtc_removes_all_top_choices_but_the_least_likely():
    # threshold .1: candidates .5, .3, .15 -> remove .5 and .3, keep .15 and the non-candidate .05
    out = SAMPLERS["xtc"](threshold=0.1, probability=1.0, protect_newline_eos=False)(None, logits(.5, .3, .15, .05))
    assert kept(out) == [2, 3]


def test_xtc_needs_two_candidates():
    scores = logits(.5, .3, .15, .05)
    out = SAMPLERS["xtc"](threshold=0.4, probability=1.0, protect_newline_eos=False)(None, scores)
    assert torch.equal(out, scores)


def test_xtc_draws_one_number_per_row_from_the_generator():
    scores = logits(.5, .3, .15, .05).repeat(8, 1)
    r = torch.rand(8, generator=torch.Generator().manual_seed(7))
    expect_applied = (r < 0.5).tolist()
    assert any(expect_applied) and not all(expect_applied)
    xtc = SAMPLERS["xtc"](threshold=0.1, probability=0.5, generator=torch.Generator().manual_seed(7),
                          protect_newline_eos=False)
    out = xtc(None, scores)
    applied = torch.isinf(out[:, 0]).tolist()
    assert applied == expect_applied


def test_xtc_seeded_runs_repeat():
    torch.manual_seed(1)
    scores = torch.randn(4, 20) * 2
    a = SAMPLERS["xtc"](threshold=0.05, probability=0.5, generator=torch.Generator().manual_seed(3),
                        protect_newline_eos=False)
    b = SAMPLERS["xtc"](threshold=0.05, probability=0.5, generator=torch.Generator().manual_seed(3),
                        protect_newline_eos=False)
    outs_a = [a(None, scores) for _ in range(5)]
    outs_b = [b(None, scores) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(torch.equal(outs_a[0], x) for x in outs_a[1:])  # the draws do differ per step


class NewlineEosTokenizer:
    """Just enough for XTC: '\\n' -> 1 (after an unrelated id, as a BPE tokenizer may give), EOS 3."""

    eos_token_id = 3

    def encode(self, text, add_special_tokens=False):
        return [7 if c != "\n" else 1 for c in "x" + text]


def test_xtc_leaves_the_row_alone_when_newline_or_eos_would_go():
    # text-generation-webui modules/sampler_hijack.py XTCLogitsWarper: special ids are
    # [tokenizer.encode("\n")[-1], tokenizer.eos_token_id]; `if indices_to_remove[:, special].any():
    # return scores`. probs .5 .3 .15 .05 at threshold .1: tokens 0 and 1 would go (1 = newline)
    xtc = SAMPLERS["xtc"](threshold=0.1, probability=1.0, tokenizer=NewlineEosTokenizer())
    assert xtc.protected_ids == (1, 3)
    scores = logits(.5, .3, .15, .05)
    assert torch.equal(xtc(None, scores), scores)
    eos_first = logits(.5, .05, .15, .3)  # EOS (3) is a top choice that would go
    assert torch.equal(xtc(None, eos_first), eos_first)
    # newline as the least likely candidate stays anyway, so XTC acts: 0 and 2 go
    assert kept(xtc(None, logits(.5, .15, .3, .05))) == [1, 3]


def test_xtc_without_protection_is_koboldcpp_and_llamacpp():
    # KoboldCpp sample_xtc and llama.cpp llama_sampler_xtc have no newline / EOS rule
    xtc = SAMPLERS["xtc"](threshold=0.1, probability=1.0, protect_newline_eos=False)
    assert kept(xtc(None, logits(.5, .3, .15, .05))) == [2, 3]


def test_xtc_protection_needs_the_tokenizer():
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        SAMPLERS["xtc"](threshold=0.1, probability=0.5)


# ---- DRY -------------------------------------------------------------------------------------------


def test_dry_penalises_token_that_extends_repeat():
    # ... 1 2 3 4 ... 1 2 3: token 4 would extend "1 2 3" (match length 3);
    # allowed_length 2 -> penalty 0.8 * 2^(3-2) = 1.6
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
    scores = torch.zeros(1, 10)
    dry = SAMPLERS["dry"](multiplier=0.8, base=2.0, allowed_length=2, tokenizer=CharTokenizer())
    expected = torch.zeros(1, 10)
    expected[0, 4] = -1.6
    torch.testing.assert_close(dry(ids, scores), expected)


def test_dry_uses_each_candidates_longest_match():
    # last token 3; after earlier 3s come 7 (match "2 3", length 2) and 8 (match "1 2 3", length 3)
    ids = torch.tensor([[2, 3, 7, 1, 2, 3, 8, 0, 1, 2, 3]])
    dry = SAMPLERS["dry"](multiplier=1.0, base=3.0, allowed_length=2, tokenizer=CharTokenizer())
    out = dry(ids, torch.zeros(1, 10))
    expected = torch.zeros(1, 10)
    expected[0, 7] = -1.0  # 1 * 3^0
    expected[0, 8] = -3.0  # 1 * 3^1
    torch.testing.assert_close(out, expected)


def test_dry_stops_at_sequence_breakers_and_range():
    dry = SAMPLERS["dry"](multiplier=1.0, base=2.0, allowed_length=2, sequence_breakers=[":"],
                          tokenizer=CharTokenizer())
    assert dry.breaker_ids == {5}
    # the match "5 3" cannot extend across the breaker 5: length 1 < 2, no penalty
    ids = torch.tensor([[1, 5, 3, 4, 1, 5, 3]])
    assert torch.equal(dry(ids, torch.zeros(1, 10)), torch.zeros(1, 10))
    # without breakers the same ids give length 3
    plain = SAMPLERS["dry"](multiplier=1.0, base=2.0, allowed_length=2, sequence_breakers=[],
                            tokenizer=None)
    assert plain(ids, torch.zeros(1, 10))[0, 4] == -2.0
    # range 4 keeps only [4, 1, 5, 3]: no earlier 3 in the window
    ranged = SAMPLERS["dry"](multiplier=1.0, base=2.0, allowed_length=2, range=4, sequence_breakers=[])
    assert torch.equal(ranged(ids, torch.zeros(1, 10)), torch.zeros(1, 10))


# ---- mirostat -------------------------------------------------------------------------------------


def test_mirostat_v2_two_steps():
    # surprises -log2 p = [1, 2, 3, 3]; tau 1.1 -> mu 2.2 keeps tokens 0, 1 (renormalised 2/3, 1/3)
    scores = logits(.5, .25, .125, .125)
    m = SAMPLERS["mirostat"](version=2, tau=1.1, eta=1.0)
    assert kept(m(torch.tensor([[0, 3]]), scores)) == [0, 1]
    # token 1 was picked: s = log2 3; mu = 2.2 - 1.0 * (log2 3 - 1.1) = 1.715 -> keep token 0 only
    out = m(torch.tensor([[0, 3, 1]]), scores)
    assert m.mu.item() == pytest.approx(2.2 - (math.log2(3) - 1.1))
    assert kept(out) == [0]


def test_mirostat_v1_two_steps():
    # Zipf with exponent 2: p ~ [1, 1/4, 1/9, 1/16] -> s_hat = 2, eps = 1, N = 4
    z = 1 + 1 / 4 + 1 / 9 + 1 / 16
    scores = logits(1 / z, 1 / 4 / z, 1 / 9 / z, 1 / 16 / z)
    # tau 1 -> mu 2: k = (1 * 2^2 / (1 - 4^-1)) ^ (1/2) = sqrt(16/3) = 2.31 -> 2 tokens
    m = SAMPLERS["mirostat"](version=1, tau=1.0, eta=1.0)
    assert kept(m(torch.tensor([[5, 0]]), scores)) == [0, 1]
    # picked token 1, kept distribution [.8, .2]: s = log2 5; mu = 2 - (log2 5 - 1) = 0.678
    # k = (2^0.678 / .75) ^ .5 = 1.46 -> 1 token
    out = m(torch.tensor([[5, 0, 1]]), scores)
    mu = 2 - (math.log2(5) - 1)
    assert m.mu.item() == pytest.approx(mu)
    assert math.floor((2**mu / 0.75) ** 0.5) == 1
    assert kept(out) == [0]


def test_mirostat_state_is_per_row_and_resets_on_a_new_sequence():
    scores = logits(.5, .25, .125, .125).repeat(2, 1)
    m = SAMPLERS["mirostat"](version=2, tau=1.1, eta=1.0)
    m(torch.tensor([[0, 3], [0, 4]]), scores)
    m(torch.tensor([[0, 3, 0], [0, 4, 1]]), scores)
    # row 0 picked token 0 (s = log2 1.5), row 1 token 1 (s = log2 3)
    expected = [2.2 - (math.log2(1.5) - 1.1), 2.2 - (math.log2(3) - 1.1)]
    assert m.mu.tolist() == pytest.approx(expected)
    # row 1 no longer continues its previous sequence: reset to 2 tau; row 0 updates again
    m(torch.tensor([[0, 3, 0, 0], [9, 9, 9, 9]]), scores)
    assert m.mu.tolist() == pytest.approx([expected[0] - (math.log2(1.5) - 1.1), 2.2])
    # a new generate call (shorter input) resets every row
    m(torch.tensor([[0, 1], [0, 1]]), scores)
    assert m.mu.tolist() == pytest.approx([2.2, 2.2])



def test_adaptive_p_two_steps_by_hand():
    # p = [.5, .3, .2], target .5: first step at equilibrium, t' = .5, d = |p - .5| / .3
    scores = logits(.5, .3, .2)
    a = SAMPLERS["adaptive_p"](target=0.5, decay=0.9)
    out = a(torch.tensor([[7]]), scores)
    assert out[0].tolist() == pytest.approx([5.0, 5 - 10 * (2 / 3) ** 2 / (5 / 3), 5 - 10 * 1 / 2], abs=1e-5)
    # token 1 picked (original p .3): S = .3 + .9 * 5 = 4.8, W = 1 + .9 * 10 = 10 -> t' = 1 - .48
    out = a(torch.tensor([[7, 1]]), scores)
    d = [abs(p - 0.52) / 0.3 for p in (.5, .3, .2)]
    assert out[0].tolist() == pytest.approx([5 - 10 * x * x / (1 + x) for x in d], abs=1e-5)
    assert int(out.argmax()) == 0  # .5 is now the one nearest the raised target


def test_adaptive_p_keeps_removed_tokens_removed_and_is_off_below_zero():
    scores = logits(.6, 0, .4)
    assert kept(SAMPLERS["adaptive_p"](target=0.3)(torch.tensor([[0]]), scores)) == [0, 2]
    off = SAMPLERS["adaptive_p"](target=-0.01)
    assert torch.equal(off(torch.tensor([[0]]), scores), scores)
    assert off.weighted_sum is None  # no history while off


def test_quadratic_by_hand_from_the_web_uis_formula():
    # scores [2, 1, -1, -inf]: h = 2, d = [0, -1, -3]; curve 1: 2 - 0.5 d^2
    scores = torch.tensor([[2.0, 1.0, -1.0, -INF]])
    out = SAMPLERS["quadratic"](factor=0.5)(torch.tensor([[0]]), scores)
    assert out[0].tolist() == pytest.approx([2.0, 1.5, -2.5, -INF])
    # curve 2: k = 0.5, s = 0.5: 2 - 0.25 d^2 + 0.25 d^3 = [2, 1.5, -6.5]
    out = SAMPLERS["quadratic"](factor=0.5, curve=2.0)(torch.tensor([[0]]), scores)
    assert out[0].tolist() == pytest.approx([2.0, 1.5, 2 - 0.25 * 9 - 0.25 * 27, -INF])
    assert torch.equal(SAMPLERS["quadratic"](factor=0.0)(torch.tensor([[0]]), scores), scores)

# ---- no-repeat n-gram fallback, pick_token -----------------------------------------------------------


def test_no_repeat_ngram_keeps_best_token_when_everything_is_banned():
    ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    scores = torch.tensor([[0.5, 2.0, 1.0]])
    out = SAMPLERS["no_repeat_ngram"](size=1)(ids, scores)
    assert kept(out) == [1]
    out = SAMPLERS["no_repeat_ngram"](size=1, min_tokens_to_keep=2)(ids, scores)
    assert kept(out) == [1, 2]


def test_no_repeat_ngram_keeps_the_first_of_tied_best_tokens_when_everything_is_banned():
    """Hypothesis found this row against transformers' argmax convention: three tied -0.0 scores,
    every token banned; torch.topk kept the third, argmax (and greedy decoding) picks the first."""
    ids = torch.tensor([[5, 0, 5, 1, 5, 2, 5]])
    scores = torch.tensor([[-0.0, -0.0, -0.0, -INF, -INF, -INF]])
    out = SAMPLERS["no_repeat_ngram"](size=2)(ids, scores)
    assert kept(out) == [0]


def test_pick_token_greedy_is_argmax():
    scores = torch.tensor([[0.1, 3.0, -INF], [5.0, 1.0, 2.0]])
    assert pick_token(scores, do_sample=False).tolist() == [1, 0]


def test_pick_token_greedy_agrees_with_torch_argmax_on_ties_nan_and_removed_tokens():
    # the greedy pick reads numpy's argmax on a CPU: torch's rule decides (first maximum, NaN wins)
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (64, 30), generator=gen).float()  # many ties
    scores[::5, 7] = float("nan")
    scores[1::3, :10] = -INF
    scores[2] = -INF  # all removed
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        got = pick_token(scores.to(dtype), do_sample=False)
        assert got.dtype == torch.int64 and torch.equal(got, torch.argmax(scores.to(dtype), dim=-1)), dtype


def test_pick_token_samples_like_multinomial_with_generator():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    got = pick_token(scores, True, generator=torch.Generator().manual_seed(11))
    ref = torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator().manual_seed(11)).squeeze(1)
    assert got.shape == (3,) and torch.equal(got, ref)
    assert set(pick_token(logits(0, .5, 0, .5).repeat(50, 1), True).tolist()) <= {1, 3}


def test_pick_token_inverse_cdf_draws_the_softmax_of_the_tokens_left():
    # the reference: softmax by hand; 40,000 seeded draws land within 4.5 standard errors of it
    inf = float("inf")
    scores = torch.tensor([[0.0, 1.0, -inf, 2.0, -1.0, -inf, 0.5]])
    z = [math.exp(v) for v in scores[0].tolist()]
    want = [v / sum(z) for v in z]
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    counts = torch.bincount(torch.cat([pick_token(scores, True, gen, draw="inverse-cdf") for _ in range(n)]),
                            minlength=7).tolist()
    assert counts[2] == counts[5] == 0  # removed tokens are never drawn
    for c, p in zip(counts, want):
        assert abs(c / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12, (counts, want)


def test_pick_token_inverse_cdf_repeats_from_the_seed_and_keeps_to_a_truncated_vocabulary():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 49_152, generator=gen) * 3
    scores[1, scores[1] < 7] = -INF  # a few hundred left, as after top-p or min-p
    left = set(torch.nonzero(scores[1] > -INF).squeeze(1).tolist())
    runs = [pick_token(scores, True, torch.Generator().manual_seed(s), draw="inverse-cdf").tolist() for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]
    draws = [int(pick_token(scores[1:2], True, gen, draw="inverse-cdf")) for _ in range(300)]
    assert set(draws) <= left and len(set(draws)) > 20
    for half in (torch.float16, torch.bfloat16):  # other dtypes draw the same way
        assert pick_token(scores[:1].to(half), True, torch.Generator().manual_seed(3), draw="inverse-cdf").dtype \
            == torch.int64


@pytest.mark.parametrize("bad", [[float("nan"), 1.0], [float("inf"), 1.0], [-INF, -INF]],
                         ids=["nan", "inf", "nothing-left"])
def test_pick_token_inverse_cdf_fails_where_multinomial_fails(bad):
    for draw in ("multinomial", "inverse-cdf"):
        with pytest.raises(RuntimeError, match="probability tensor"):
            pick_token(torch.tensor([bad]), True, draw=draw)
    with pytest.raises(ValueError, match="draw"):
        pick_token(torch.tensor([[1.0, 2.0]]), True, draw="gumbel")


def test_the_llamacpp_backend_draws_by_inverse_cdf_and_transformers_as_generate(monkeypatch, tiny_tokenizer):
    from cfg_textgen.backends.transformers import TransformersBackend
    from cfg_textgen.engine import generate_stream
    from cfg_textgen.samplers import base

    assert TransformersBackend.token_draw == "multinomial"
    llama = pytest.importorskip("cfg_textgen.backends.llama_cpp")
    assert llama.LlamaCppBackend.token_draw == "inverse-cdf"
    from conftest import make_tiny_model

    calls = []
    real = base._inverse_cdf
    monkeypatch.setattr(base, "_inverse_cdf", lambda row, gen: calls.append(1) or real(row, gen))
    backend = TransformersBackend(make_tiny_model("llama"), tiny_tokenizer)
    runs = []
    for draw in ("multinomial", "inverse-cdf", "inverse-cdf"):
        backend.token_draw = draw  # the engine asks the backend how to draw
        stream = generate_stream(backend, None, "The knight", scale=1.5, max_new_tokens=6, seed=4)
        list(stream)
        runs.append(stream.token_ids)
    assert len(calls) == 12 and runs[1] == runs[2]


def test_pick_token_matches_model_generate_after_manual_seed():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    prompt = torch.tensor([[1, 17, 42, 99]])
    torch.manual_seed(1234)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=6,
                         top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
    ids = prompt
    torch.manual_seed(1234)
    with torch.no_grad():
        for _ in range(6):
            scores = model(ids).logits[:, -1, :].float()
            ids = torch.cat([ids, pick_token(scores, do_sample=True)[:, None]], dim=1)
    assert torch.equal(ids, ref)


# ---- logit bias and bans, by hand -------------------------------------------------------------


def test_logit_bias_adds_each_bias_and_bans_by_hand():
    scores = torch.tensor([[1.0, 2.0, float("-inf"), 0.5, 3.0]])
    out = SAMPLERS["logit_bias"](bias={0: 2.5, 2: 10.0, 3: -1.0, 99: 4.0}, ban=[4, 77])(None, scores)
    # token 2 was removed before: a bias never brings it back; 99 and 77 are beyond this vocabulary
    assert out.tolist() == [[3.5, 2.0, float("-inf"), -0.5, float("-inf")]]
    assert scores[0, 4] == 3.0  # the input is not changed


def test_logit_bias_ban_of_every_token_keeps_the_best():
    scores = torch.tensor([[1.0, 2.0, 0.0]])
    out = SAMPLERS["logit_bias"](ban=[0, 1, 2])(None, scores)
    assert kept(out) == [1]


def test_logit_bias_rows_where_the_bans_leave_too_few_keep_their_best_and_the_others_are_banned():
    inf = float("inf")
    scores = torch.tensor([[1.0, 2.0, 0.5, 3.0, 0.0, 0.25],      # 2 left after the bans (2, 5): enough
                           [1.0, -inf, -inf, 3.0, 0.5, -inf],    # none left: the best 2 banned (3, 0) stay
                           [-inf, 2.0, 0.5, -inf, -inf, -inf],   # 1 left: token 1 comes back beside 2
                           [4.0, 1.0, 0.5, -inf, -inf, -inf]])   # 1 left: the best 2 are 0 and 2; 1 goes
    ban = SAMPLERS["logit_bias"](bias={2: 1.0}, ban=[0, 1, 3, 4], min_tokens_to_keep=2)
    expected = [[-inf, -inf, 1.5, -inf, -inf, 0.25],
                [1.0, -inf, -inf, 3.0, -inf, -inf],
                [-inf, 2.0, 1.5, -inf, -inf, -inf],
                [4.0, -inf, 1.5, -inf, -inf, -inf]]
    assert ban(None, scores).tolist() == expected
    for row in range(4):  # alone, each row takes its own way (enough left, or the best kept)
        assert ban(None, scores[row:row + 1]).tolist() == [expected[row]]
