"""Every sampler returns on its input's device and dtype: a CPU test over
float32, bfloat16 and float16 (where torch has the op for that dtype on the CPU), and the same test
on CUDA when a GPU is present. Each sampler runs with parameters that switch its work on, so the
tensors it creates (repetition penalty's window arrays, XTC's random draw, ...) are exercised."""

from __future__ import annotations

import pytest
import torch

from cfg_textgen.samplers import SAMPLERS


class Tok:
    """Enough of a tokenizer for DRY's breakers and XTC's newline / EOS ids."""

    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 5 for c in text]


ACTIVE = {  # parameters that make each sampler do its work
    "temperature": {"temperature": 0.7},
    "dynamic_temperature": {"low": 0.5, "high": 1.5},
    "top_k": {"k": 5},
    "top_p": {"p": 0.8},
    "typical": {"p": 0.8},
    "min_p": {"p": 0.05},
    "top_a": {"a": 0.2},
    "tfs": {"z": 0.9},
    "epsilon": {"epsilon": 0.001},
    "eta": {"eta": 0.001},
    "repetition_penalty": {"penalty": 1.3, "range": 8, "slope": 0.7, "presence": 0.1, "frequency": 0.05,
                           "whitelist": [1]},
    "no_repeat_ngram": {"size": 2},
    "mirostat": {"tau": 3.0},
    "unified": {"linear": 0.8, "quad": 0.1, "conf": 0.05},
    "xtc": {"threshold": 0.01, "probability": 1.0},
    "dry": {"multiplier": 0.8, "allowed_length": 1},
    "top_n_sigma": {"n": 1.0},
    "logit_bias": {"bias": {3: 2.5, 60: -1.0, 500: 1.0}, "ban": [0, 7]},
    "adaptive_p": {"target": 0.3, "decay": 0.8},
    "quadratic": {"factor": 0.5, "curve": 1.5},
}
VARIANTS = {"repetition_penalty-halves": ("repetition_penalty", {"penalty": 1.3, "range": 8, "slope": 0.5,
                                                                 "slope_mode": "halves"}),
            "repetition_penalty-full": ("repetition_penalty", {"penalty": 1.3, "range": 200}),  # window >= vocab
            "mirostat-v1": ("mirostat", {"version": 1, "tau": 3.0})}
CASES = {name: (name, params) for name, params in ACTIVE.items()} | VARIANTS


def test_device_cases_cover_every_sampler():
    assert set(ACTIVE) == set(SAMPLERS)


def build(name, params, device):
    extra = {}
    if SAMPLERS[name].needs_tokenizer:
        extra["tokenizer"] = Tok()
    if name == "xtc":
        extra["generator"] = torch.Generator(device=device).manual_seed(0)
    return SAMPLERS[name](**params, **extra)


def run(name, params, dtype, device):
    g = torch.Generator().manual_seed(0)
    vocab = 64 if not name.endswith("full") else 40
    scores = (torch.randn(2, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    scores[1, 50 % vocab:] = float("-inf")  # a row that an earlier truncation cut
    ids = torch.randint(0, 16, (2, 120 if name.endswith("full") else 24), generator=g).to(device)
    sampler = build(name.split("-")[0] if name not in SAMPLERS else name, params, device)
    out = sampler(ids, scores)
    if name.startswith(("mirostat", "adaptive_p")):  # its second call uses the state of the first
        out = sampler(torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1), scores)
    return scores, out


def check(case, dtype, device):
    name, params = CASES[case]
    try:
        scores, out = run(case if case in SAMPLERS else case, params, dtype, device)
    except RuntimeError as err:  # e.g. "not implemented for 'Half'" on the CPU
        if dtype != torch.float32 and "not implemented" in str(err):
            pytest.skip(f"torch has no {dtype} op on {device}: {err}")
        raise
    assert out.device == scores.device and out.dtype == scores.dtype, (case, out.device, out.dtype)
    assert torch.isfinite(out).any(dim=-1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_returns_on_the_input_device_and_dtype_cpu(case, dtype):
    check(case, dtype, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_returns_on_the_input_device_and_dtype_cuda(case, dtype):
    check(case, dtype, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_xtc_draws_from_a_cpu_generator_on_cuda_scores():
    xtc = SAMPLERS["xtc"](threshold=0.01, probability=0.5, protect_newline_eos=False,
                          generator=torch.Generator().manual_seed(3))
    out = xtc(None, torch.randn(4, 64, device="cuda"))
    assert out.device.type == "cuda"
