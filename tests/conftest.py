"""Shared fixtures: tiny randomly initialised transformers models built from a config, a small
byte-level BPE tokenizer trained in the test session, and (for slow tests) the real default model."""

from __future__ import annotations

import os

# The suite mixes torch's OpenMP threads and llama.cpp's in one process (and in the server processes
# it starts, which inherit this) on CI's 2 cores: with OpenMP's default waiting, each side's idle
# threads spin while the other computes, and llama.cpp tests ran many times slower. Users keep the
# default (runtime.configure_process leaves OMP_WAIT_POLICY alone); only the tests wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_ARCHS = ("llama", "gpt2", "qwen2")

_CORPUS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The knight rode through the rain, his sword heavy at his side.",
    "She opened the door and the cold wind of the north came in.",
    "Café, naïve, déjà vu: accents are part of every story. 🦊🐉✨",
    "\"Run!\" he shouted: the dragon was awake.\n\nChapter two\n",
] * 4


def make_tiny_tokenizer():
    """A ~400-token byte-level BPE with <s> (BOS), </s> (EOS) and <pad>; trained in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_model(arch: str = "llama", vocab_size: int = 400, seed: int = 0):
    """A randomly initialised causal LM with 2 small layers; deterministic for a given seed."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # random init gives near-uniform distributions; sharpen the output layer so that greedy and
    # top-k choices are clear (a realistic peaked distribution rather than near-ties)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
        model.get_output_embeddings().weight.mul_(2.0 if arch == "gpt2" else 5.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llama saved as a local Hugging Face folder (model + tokenizer), for --model PATH."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per session.

    It uses the user's normal converted-model cache ($CFG_TEXTGEN_CACHE or ~/.cache/cfg-textgen):
    the entry is exactly what the CLI would create, and reusing it saves ~30 s per test run.
    Tests of the cache itself point CFG_TEXTGEN_CACHE at tmp_path."""
    from cfg_textgen.models import load_default

    return load_default()
