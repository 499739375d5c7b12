"""What every user sees on stderr.

transformers 5.24 renamed forward's `past_key_values` to `cache`: the old name still works until
5.40 but raises a FutureWarning from every call (and logs "`past_key_values`/`cache_params` are
deprecated" once per process when the returned cache is read by its old name). Our processor, engine
and CLI use whichever name the installed transformers has, and run clean with warnings as errors.
The CLI shows one status line while loading instead of transformers' "Loading weights" bars.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cfg_textgen.engine import generate_stream
from cfg_textgen.backends.transformers import cache_keyword
from cfg_textgen.guidance import CFGLogitsProcessor
from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEPRECATED = "deprecated"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """Every message transformers logs during the test; its once-per-process cache is cleared so
    that a deprecation logged by an earlier test is logged again here."""
    from transformers.utils import logging as hf_logging

    logging.Logger.warning_once.cache_clear()
    handler = _Records()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def test_the_installed_transformers_takes_cache_under_the_name_we_use():
    model = make_tiny_model("llama")
    import inspect

    assert cache_keyword(model) in inspect.signature(model.forward).parameters
    assert cache_keyword(model.base_model) in inspect.signature(model.base_model.forward).parameters


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.filterwarnings("error::DeprecationWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_processor_and_engine_raise_no_future_or_deprecation_warning(arch, tiny_tokenizer, transformers_log):
    model = make_tiny_model(arch)
    ids = tiny_tokenizer("Once upon a time", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        # greedy and beams (the branch's cache is reordered), text and last-token opposing branches
        for kw in (dict(num_beams=1), dict(num_beams=3)):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0, logits_processor=[CFGLogitsProcessor(model, 2.0, [1, 5, 6])], **kw)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                       logits_processor=[CFGLogitsProcessor(model, 2.0, mode="last-token")])
        for scale in (1.0, 2.0):  # the engine's batch-1 and batch-2 paths (and its split output layer)
            "".join(generate_stream(model, tiny_tokenizer, "Once upon a time", scale=scale, max_new_tokens=6,
                                    do_sample=False))
    assert not [m for m in transformers_log if DEPRECATED in m], transformers_log


def _cli(*args, model_dir):
    return subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning",
                           "-m", "cfg_textgen.cli", *args, "--model", str(model_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_runs_with_future_warnings_as_errors_and_one_status_line(tiny_model_dir):
    r = _cli("generate", "Once upon a time", "--cfg-scale", "2", "--tokens", "6", "--seed", "1",
             model_dir=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert DEPRECATED not in r.stderr and "Warning" not in r.stderr, r.stderr
    assert "Loading weights" not in r.stderr and "%|" not in r.stderr, r.stderr
    status = [line for line in r.stderr.splitlines() if "loading model" in line]
    assert len(status) == 1 and "model ready in" in status[0], r.stderr


def test_cli_explain_runs_with_future_warnings_as_errors(tiny_model_dir):
    """The analysis path: the engine on the transformers backend, then teacher-forced scoring."""
    r = _cli("explain", "Once upon a time", "--scale", "2", "--tokens", "4", "--seed", "1",
             model_dir=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert DEPRECATED not in r.stderr and "Loading weights" not in r.stderr, r.stderr


def test_cli_verbose_shows_the_loading_bars(tiny_model_dir):
    r = _cli("generate", "Once upon a time", "--cfg-scale", "1", "--tokens", "2", "--seed", "1", "--verbose",
             model_dir=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" in r.stderr
