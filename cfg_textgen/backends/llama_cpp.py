"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API, many pairs at once.

One llama.cpp context holds every live sequence: each story and each opposing prompt is its own
sequence id (no padding, each at its own positions). A pair joins with ONE `llama_decode` of its
story and opposing prompt side by side; each step is ONE `llama_decode` of the next token of
every live sequence (up to STEP_CHUNK tokens: 16 pairs with CFG; more take further decodes),
with an output at each sequence's last token. The logits are read as numpy views of llama.cpp's
output buffer and handed to torch without a copy (`torch.from_numpy`); a pair's story and
opposing rows are adjacent in that buffer, so `pair.logits` is one (rows, vocab) view. Releasing
a pair frees its slots but leaves their tokens in the KV cache (the prompt cache, below).

Prompt cache: every slot (one sequence id, one KV stream) records the tokens its cells hold,
position by position. A new pair's story takes the free slot whose tokens share the longest
prefix with it if that is more than half the story (llama.cpp server's rule), else the least
recently used free slot (never-used ones first), so that concurrent writers keep each other's
caches while older slots are free; its opposing prompt then does the same among the slots left
(SillyTavern's negative prompt is the story with a line inserted: it finds the slot of the last
negative prompt; a blank one is BOS alone, read again). The slot's cells from the first differing
position on are removed (`llama_memory_seq_rm(seq, p, -1)`) and only the rest is read, the last
prompt token always (its logits are the pair's first). Positions need no care: each sequence has
its own stream, so a kept prefix sits at positions 0..p-1 and the rest follows at p. `open(ids,
cache=False)` (a request's `cache_prompt: false`) or `RuntimeSettings(cache_prompt=False)` reads
every prompt token; `prefilled_tokens` counts the prompt tokens read, `pair.cached` those kept.
Exactness: in the deterministic mode (micro-batches of 32) a warm read gives the cold read's
logits exactly; with the default micro-batches a cached prefix was read (or, for generated
tokens, decoded one by one) with other kernels than a cold read would use, and logits differ by
the kernels' rounding (measured up to ~0.6 on the default model; tests/test_prompt_cache.py).

Context shift (`find_hole`): a story cut at the front for the window (BOS and a memory block kept,
the oldest story tokens lost) shares only BOS + memory with its cached sequence; when the rest of
the new prompt continues the cached tokens after a hole, the hole's cells are removed and the
ones after it moved down (`llama_memory_seq_rm` + `llama_memory_seq_add`; llama.cpp re-rotates
their RoPE keys), and only what follows is read. Not in the deterministic mode (the moved cells
were computed with the dropped tokens in view) nor where `llama_memory_can_shift` says no.

Chunked prefill: `open` takes the slots and `feed(pair, budget)` reads at most `budget` prompt
tokens per llama_decode (the decode loop gives it `prefill_chunk`, `--batch-size`, per step), each
row's last token held back for the decode that finishes the pair and outputs both rows' logits
together. The decode loop calls it between the running pairs' steps, never in the same decode.
`rewind(pair, n)` takes the last n tokens back from both rows (cells and records alike).

Exactness: a step's logits are the same whatever else is in the batch (see `run`). A prompt
longer than a few dozen tokens is prefilled by llama.cpp's large-batch kernels, which round
differently from token-by-token decoding (up to ~0.4 in a logit on the default model);
`n_ubatch=32` makes every micro-batch small, so a prefill equals decoding token by token
exactly (for references; prefill then takes ~2x longer). In the deterministic mode
(`RuntimeSettings(deterministic=True)`) a decode of a single token (a scale-1 job stepping alone)
runs on one llama.cpp thread (`_make_context` says why: with more, flash attention splits a lone
query's keys per thread and the job's logits depend on whether others ran); by default it runs on
every thread, faster, and a lone job's logits drift from the deterministic ones by a bounded amount
(README, benchmarks/bench_drift.py).

    backend = LlamaCppBackend("model.gguf", RuntimeSettings(threads=8), pairs=1)
    [pair] = backend.prefill([(story_ids, opposing_ids or None)])
    pair.logits                                   # (2 or 1, vocab) float32, zero-copy view
    [logits] = backend.step([(pair, token)])      # one token into both of the pair's sequences
    backend.release(pair)

The KV cache is split: one stream of `n_ctx` cells per sequence (llama.cpp's `kv_unified=False`;
llama.cpp gives each of the `n_seq_max` sequences `n_ctx / n_seq_max` cells of the context, so the
context is sized `n_ctx * 2 * pairs`). A unified cache (any sequence in any cell) is NOT exact:
after a pair is released (`llama_memory_seq_rm`), llama.cpp puts the other sequences' next tokens
into the freed cells, out of position order, and their logits move by up to ~1.4 on the default
model (greedy tokens part; tests/test_llamacpp_batching.py, the staggered case). With one stream
per sequence a sequence's cells hold only its own tokens in order, whatever else joins or leaves.
Nor would a unified cache let a pair take less memory where it matters: there `llama_memory_seq_cp`
shares the donor's cells (a negative prompt's copy of the story would cost none), but a shifted
cell moves for every sequence holding it (measured: after a copy, a context shift of one sequence
moved the other's positions too and its next decode failed), so the story and a negative prompt
that shares its cells could no longer shift when a long chat outgrows the window, and a writer's
single pair needs two windows in the worst case (story and negative prompt each near the window)
either way.
Each pair takes two sequence slots (one at scale 1), each with the full window, so a pair that
has a free slot always fits (the engine's context cut bounds story/opposing + new tokens by the
window); `fits` says whether one can start now, and the Scheduler queues a job until it can.

Memory: the default model (SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K and V) takes
30 * 2 * 3 * 64 * 2 bytes = 22.5 KiB per cell, 90 MiB per 4096-token window. Split, a context
for `pairs` holds 2 * pairs windows: 180 MiB at pairs=1 (as the unified cache of pairs + 1
windows), 720 MiB at the server's default of 4 (the unified cache had 5 windows, 450 MiB). The
price buys exactness and a full window for every story and opposing prompt at once.

Text: `tokenize` is llama.cpp's own tokenizer (special tokens in the text are parsed, as
transformers' tokenizers do); `decoder` turns each token's bytes (`llama_token_to_piece`) into
text through an incremental UTF-8 decoder, so no transformers tokenizer is ever converted.
"""

from __future__ import annotations

import itertools

import atexit
import codecs
import ctypes
import os
import sys
import weakref
from pathlib import Path
from typing import AbstractSet, Sequence

import numpy as np
import torch

from ..errors import CFGTextgenError, ModelNotFoundError
from ..runtime import CACHE_TYPES, QUANTIZED_BLOCK, RuntimeSettings, RuntimeSettingsError, kv_cell_bytes
from . import require_llama_cpp
from .base import AUTO_PAIRS, Pair, PairIds, Shortcuts

DEFAULT_WINDOW = 4096  # tokens per sequence unless the model's training context is smaller
# `pairs=None` (serve's `--parallel auto`): as many live pairs as this much KV cache holds, from 1 to
# AUTO_PAIRS. Every sequence keeps a full window (below), so a writer-sized model (a 7B's 4096-token
# window is 512 MiB in f16) gets one pair, the memory of KoboldCpp's cache plus the opposing
# prompt's, and small models get several
AUTO_KV_BYTES = 2**30
STEP_CHUNK = 32  # most tokens in one step decode: below the size where llama.cpp's kernels change
# prompt tokens a copy of another slot's cells must spare reading: it copies the whole stream (a 7B
# model's 4,096-cell f16 stream is 512 MiB, tens of ms), about what a few prompt tokens cost on a CPU;
# a turn's new text moves SillyTavern's negative line by its length, so the copy pays from a short turn on
COPY_MIN = 32


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads slow llama.cpp's matmuls)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            proc = phys = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    proc = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and proc in allowed:
                    cores.add((phys, value))
    except OSError:
        pass
    return max(1, len(cores) or len(allowed))


_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_state = {"callback": None, "last": 0}


def _quiet_logs(L) -> None:
    """Show llama.cpp's errors only. (llama-cpp-python's own filter maps ggml's levels as they were
    before WARN moved to 3, so it lets warnings through as errors.)"""
    if _log_state["callback"] is not None:
        return

    def log(level, text, user_data):
        if level != _GGML_LOG_CONT:
            _log_state["last"] = level
        if _log_state["last"] == _GGML_LOG_ERROR:
            os.write(2, text or b"")

    # the ctypes callback must outlive every llama.cpp call: keep it in the module
    _log_state["callback"] = L.llama_log_callback(log)
    L.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


_open_backends: "weakref.WeakSet[LlamaCppBackend]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free every llama.cpp context and model while Python (and the log callback) still works."""
    for backend in list(_open_backends):
        try:
            backend.close()
        except Exception:
            pass


class LlamaCppError(CFGTextgenError):
    """llama.cpp refused a batch (context full, bad input)."""


class Slot:
    """One KV stream of the context (a llama.cpp sequence id) and the tokens it holds, in order,
    at positions 0..len-1. The tokens stay after the pair that wrote them is released: the prompt
    cache (`LlamaCppBackend.open`) starts a new pair from the longest matching prefix."""

    __slots__ = ("seq", "tokens", "used_at", "busy")

    def __init__(self, seq: int):
        self.seq = seq
        self.tokens: list[int] = []  # what the stream's cells hold, position by position
        self.used_at = -1  # when it was last released (-1: never used; taken first)
        self.busy = False  # held by a live pair


class LlamaCppPair(Pair):
    """One live (story, opposing) pair: its slots (row 0 the story, row 1 the opposing prompt)
    and their prompts. While `pending` > 0 part of the prompts is still to be decoded (`feed`);
    `logits` is then a (rows, vocab) view into llama.cpp's output buffer, valid until the next
    decode. `cached_rows`: each row's prompt tokens found in the cache when the pair opened (not
    decoded again); `cached` the story's."""

    def __init__(self, slots: list[Slot], prompts: list[list[int]], cache: bool = True):
        super().__init__(len(slots))
        self.slots = slots
        self.prompts = prompts
        self.cache = cache  # False: every prompt token is read, none taken from other slots
        self.cached_rows = [len(s.tokens) for s in slots]
        self.cached = self.cached_rows[0]
        # shared[row][earlier]: the tokens row's prompt shares with an earlier row's, short of
        # either's last token (always read); the prompts never change, so counted once (only the
        # prompt cache uses it: `_waiting`)
        self.shared = [[min(common_prefix(prompts[row], prompts[earlier]),
                            len(prompts[row]) - 1, len(prompts[earlier]) - 1) for earlier in range(row)]
                       for row in range(len(prompts))] if cache else []

    @property
    def seqs(self) -> list[int]:
        return [s.seq for s in self.slots]

    @property
    def next_pos(self) -> list[int]:
        return [len(s.tokens) for s in self.slots]

    @property
    def pending(self) -> int:
        """Prompt tokens not yet decoded (0: the pair is ready to step)."""
        return sum(max(0, len(p) - len(s.tokens)) for s, p in zip(self.slots, self.prompts))

    @property
    def cells(self) -> int:
        return sum(self.next_pos)


SHIFT_ANCHOR = 8  # tokens of the prompt after its prefix that a shifted run must start with


def find_hole(cached: Sequence[int], prompt: Sequence[int], start: int) -> tuple[int, int]:
    """(hole, run): the prompt's tokens from `start` on continue `cached` after skipping `hole`
    tokens from `start`, for `run` tokens; (0, 0) when no run is worth a shift.

    What a story cut at the front looks like next turn (context.fit_context / fit_with_memory keep
    BOS and a Kobold memory block, then the most recent tokens): the cache holds BOS + memory +
    story[a:], the new prompt is BOS + memory + story[b:] + more, b > a; the hole is story[a:b].
    A run counts when it starts at the prompt's first differing token, begins with SHIFT_ANCHOR
    matching tokens and covers more than half of the prompt's rest (KoboldCpp's ContextShift,
    PurgeMissingTokens, likewise needs the new text after the common prefix to start with a long
    run of the old)."""
    rest = len(prompt) - 1 - start  # what would be read otherwise (the last token is read anyway)
    if rest < 2 * SHIFT_ANCHOR or len(cached) <= start + SHIFT_ANCHOR:
        return 0, 0
    anchor = list(prompt[start:start + SHIFT_ANCHOR])
    tail = np.asarray(cached[start + 1:], dtype=np.int64)
    best = (0, 0)
    for q in (np.flatnonzero(tail == anchor[0]) + start + 1).tolist():
        if list(cached[q:q + SHIFT_ANCHOR]) == anchor:
            run = common_prefix(cached[q:], prompt[start:])
            if run > best[1]:
                best = (q - start, run)
    return best if 2 * min(best[1], rest) > rest else (0, 0)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens `a` and `b` share from the start."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ByteDecoder:
    """Text of new tokens from their bytes: `add` returns the characters completed by this token
    (a character split over tokens comes out whole with its last byte); `flush` the rest, an
    unfinished character as U+FFFD. `released` is all text given so far."""

    def __init__(self, piece_bytes):
        self._piece = piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.released = ""

    def add(self, token_id: int) -> str:
        piece = self._utf8.decode(self._piece(int(token_id)))
        self.released += piece
        return piece

    def flush(self) -> str:
        piece = self._utf8.decode(b"", final=True)
        self.released += piece
        return piece


class LlamaTokenizer:
    """The little of a transformers tokenizer that samplers use (DRY's breakers, XTC's newline),
    over llama.cpp's own vocabulary."""

    def __init__(self, backend: "LlamaCppBackend"):
        self._b = backend
        self.bos_token_id = backend.bos_id
        eos = backend.lib.llama_vocab_eos(backend.vocab)
        self.eos_token_id = int(eos) if eos >= 0 else None
        self.all_special_ids = sorted(backend.special_ids)
        self.vocab_size = backend.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._b.tokenize(text, add_special=add_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **_) -> str:
        data = b"".join(self._b.piece_bytes(int(t), special=not skip_special_tokens) for t in ids)
        return data.decode("utf-8", errors="replace")


class LlamaCppBackend(Shortcuts):
    name = "llama.cpp"
    device = torch.device("cpu")
    # a sampled token as llama.cpp's `dist` sampler draws it: one uniform variate along the
    # candidates' cumulative probabilities (torch.multinomial draws one exponential variate per
    # vocabulary entry, ~2 ms a token on a CPU; there is no model.generate run here to match)
    token_draw = "inverse-cdf"

    def __init__(self, path: str | Path, runtime: RuntimeSettings | None = None, *, pairs: int | None = 1,
                 n_ctx: int | None = None, n_threads: int | None = None, n_ubatch: int | None = None,
                 verbose: bool = False):
        """`runtime`: threads, window, GPU layers, attention, KV cache types, determinism
        (runtime.RuntimeSettings); `n_ctx` and `n_threads` are shorthands for its `ctx_size` and
        `threads`, `n_ubatch` for its `ubatch_size`. `pairs`: live pairs the context holds (None:
        `auto_pairs`)."""
        L = self.lib = require_llama_cpp()
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        runtime = runtime or RuntimeSettings()
        if n_ctx is not None or n_threads is not None or n_ubatch is not None:
            runtime = runtime.replace(ctx_size=n_ctx if n_ctx is not None else runtime.ctx_size,
                                      threads=n_threads if n_threads is not None else runtime.threads,
                                      ubatch_size=n_ubatch if n_ubatch is not None else runtime.ubatch_size)
        self.runtime = runtime
        if runtime.n_gpu_layers != 0 and not L.llama_supports_gpu_offload():
            raise RuntimeSettingsError("n_gpu_layers", "this llama-cpp-python was built without GPU "
                                       "support; rebuild it for your GPU (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" "
                                       "pip install --force-reinstall --no-cache-dir llama-cpp-python) or "
                                       "leave the layers on the CPU")
        if not verbose:  # llama.cpp logs every load detail to stderr; keep its errors only
            _quiet_logs(L)
        L.llama_backend_init()
        self.path = path
        model_params = L.llama_model_default_params()
        model_params.n_gpu_layers = runtime.n_gpu_layers
        self.model = L.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ModelNotFoundError(f"{path}: llama.cpp could not load this GGUF file")
        self._check_cache_types()
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        train = int(L.llama_model_n_ctx_train(self.model))
        self.n_ctx = runtime.ctx_size or (min(train, DEFAULT_WINDOW) if train > 0 else DEFAULT_WINDOW)
        self.window = self.n_ctx  # KV cells per sequence (reserve(window=...) may make it smaller)
        self.n_threads = runtime.threads or physical_cores()
        self.n_threads_batch = runtime.threads_batch or self.n_threads
        self.n_ubatch = runtime.micro_batch
        bos = L.llama_vocab_bos(self.vocab)
        self.bos_id = int(bos) if bos >= 0 else None
        # llama.cpp's end-of-generation set (EOS, EOT, <|im_end|>, ...): what its own server and
        # KoboldCpp stop at; control tokens are the special ids a context cut keeps at the start
        self.eos_ids = {t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)}
        self.special_ids = {t for t in range(self.n_vocab) if L.llama_vocab_is_control(self.vocab, t)}
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.forwards = 0
        self.prefilled_tokens = 0  # prompt tokens decoded (what the prompt cache did not hold)
        self.cache_prompt = runtime.cache_prompt
        self.prefill_chunk = runtime.batch_size  # prompt tokens per decode between the others' steps
        self.shifted_tokens = 0  # cells moved out of the way by context shifts (a counter for tests)
        self.copied_tokens = 0  # prompt tokens taken from another slot's cells instead of read
        self._shift_pending = False  # a shift's keys are re-rotated at the next decode
        self.ctx = None
        self._batch = None
        self._pairs = 0
        self._make_context(self.auto_pairs() if pairs is None else max(1, pairs))
        self.tokenizer = LlamaTokenizer(self)
        _open_backends.add(self)

    # ---- context ---------------------------------------------------------------------------

    def _make_context(self, pairs: int) -> None:
        L = self.lib
        self._free_context()
        params = L.llama_context_default_params()
        streams = 2 * pairs  # a story and an opposing sequence per pair
        cells = self.window * streams
        batch = 2 * self.window  # the largest decode: one pair's story and opposing prompt
        params.n_ctx = cells  # split among the streams: n_ctx cells each
        params.n_batch = batch
        params.n_seq_max = streams
        params.n_ubatch = self.n_ubatch
        params.n_outputs_max = streams  # one output row per sequence and decode
        params.n_outputs_max_per_seq = 1
        # llama.cpp runs a decode of ONE token on `n_threads`, larger ones on `n_threads_batch`.
        # One token is a lone sequence stepping (a scale-1 job alone): there ggml's CPU flash
        # attention splits the keys (512+ cells) into one chunk per thread and merges the partial
        # sums, while a step of several sequences runs each query row whole; with 2 threads a
        # job's logits moved by up to ~1 with what else ran once its story passed ~256 tokens
        # (greedy texts parted). The deterministic mode decodes it on one thread: the split is
        # one chunk, the same sums as in a crowd. (Plain attention would avoid the split but
        # rounds a prefill differently from token-by-token steps, up to ~1 in a logit: the exact
        # reference checks need flash.) The default decodes it on every thread: a lone stream
        # on a many-core machine is the common case, and the drift is small (README).
        params.n_threads = 1 if self.runtime.deterministic else self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.flash_attn_type = self.runtime.flash_attn_type
        params.type_k = CACHE_TYPES[self.runtime.cache_type_k]
        params.type_v = CACHE_TYPES[self.runtime.cache_type_v]
        # one KV stream per sequence: see the module docstring (a unified cache is not exact)
        params.kv_unified = False
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise LlamaCppError(f"llama.cpp could not create a context of {cells} tokens for "
                                f"{pairs} pairs ({self.kv_bytes(cells) / 2**20:.0f} MiB of KV cache: "
                                f"out of memory? a smaller window, fewer parallel requests or a "
                                f"quantized KV cache take less: --ctx-size, --parallel, "
                                f"--cache-type-k/--cache-type-v)")
        self.cells = int(L.llama_n_ctx(self.ctx))
        self.seq_cells = int(L.llama_n_ctx_seq(self.ctx))
        if self.seq_cells < self.window:
            raise LlamaCppError(f"llama.cpp gave each sequence {self.seq_cells} cells, not the "
                                f"window of {self.window}")
        self.memory = L.llama_get_memory(self.ctx)
        # context shift moves cached cells to other positions: never in the deterministic mode (the
        # moved cells were computed with the dropped tokens in view, so the text would depend on
        # what the cache held), and only where the model's memory can shift (RoPE; not recurrent)
        self.context_shift = (self.runtime.context_shift and not self.runtime.deterministic
                              and bool(L.llama_memory_can_shift(self.memory)))
        self._batch = L.llama_batch_init(batch, 0, 1)
        b = self._batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(batch,))
        self._nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(batch,))
        self._out = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)),
                                          shape=(batch,))
        self._nseq[:] = 1
        self._seq_ptrs = [b.seq_id[i] for i in range(batch)]
        self._logits_view = None  # (buffer address, rows), view: `_decode`
        self._slots = [Slot(seq) for seq in range(streams)]  # each stream empty
        self._clock = 0  # counts releases: a slot's `used_at` orders them (least recently used)
        self._pairs = pairs

    def _free_context(self) -> None:
        L = self.lib
        self.memory = None
        self._logits_view = None
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None

    def _meta_int(self, key: str) -> int | None:
        """An integer from the GGUF's metadata (None when the model does not have it)."""
        buf = ctypes.create_string_buffer(128)
        if self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf)) < 0:
            return None
        try:
            return int(buf.value.decode())
        except ValueError:
            return None

    def _head_sizes(self) -> tuple[int, int]:
        """(key, value) head sizes: the GGUF's `<arch>.attention.key_length/value_length`, else
        the embedding split over the heads (llama.cpp's own fallback)."""
        buf = ctypes.create_string_buffer(64)
        self.lib.llama_model_meta_val_str(self.model, b"general.architecture", buf, len(buf))
        arch = buf.value.decode()
        default = int(self.lib.llama_model_n_embd(self.model)) // max(1, int(self.lib.llama_model_n_head(self.model)))
        k = self._meta_int(f"{arch}.attention.key_length") or default
        v = self._meta_int(f"{arch}.attention.value_length") or default
        return k, v

    def _check_cache_types(self) -> None:
        """The head-size rule llama.cpp applies to a quantized cache with flash attention (it
        refuses a context otherwise): checked first, so the error can name the flag."""
        head_k, head_v = self._head_sizes()
        for field, quantized, head in (("cache_type_k", self.runtime.k_quantized, head_k),
                                       ("cache_type_v", self.runtime.v_quantized, head_v)):
            if quantized and self.runtime.flash_attn != "off" and head % QUANTIZED_BLOCK:
                raise RuntimeSettingsError(field, f"`{field}` {getattr(self.runtime, field)} stores "
                                           f"blocks of {QUANTIZED_BLOCK} values, which do not divide "
                                           f"this model's head size of {head}: use f16")
        self.cell_bytes = kv_cell_bytes(int(self.lib.llama_model_n_layer(self.model)),
                                        int(self.lib.llama_model_n_head_kv(self.model)),
                                        head_k, head_v, self.runtime)

    def auto_pairs(self) -> int:
        """As many pairs (each 2 sequences of a full window) as AUTO_KV_BYTES of KV cache hold,
        from 1 to AUTO_PAIRS."""
        return max(1, min(AUTO_PAIRS, int(AUTO_KV_BYTES // self.kv_bytes(2 * self.window))))

    @property
    def pairs(self) -> int:
        """Live pairs the context holds."""
        return self._pairs

    def kv_bytes(self, cells: int | None = None) -> float:
        """Bytes of KV cache for `cells` cells (default: the context's now)."""
        return self.cell_bytes * (self.cells if cells is None else cells)

    def reserve(self, pairs: int, window: int | None = None) -> None:
        """Make room for `pairs` live pairs; a new context is made only when none is live.

        `window` (tokens per sequence, at most `n_ctx`; None: `n_ctx`) sizes every sequence's KV
        cells anew: a caller that knows its longest row plus new tokens (the analysis commands)
        takes that much memory instead of a full window per sequence. `n_ctx` stays the model's
        window (the context cut); a row longer than `window` is refused by `run`."""
        if window is None:
            window = self.n_ctx
        if isinstance(window, bool) or not isinstance(window, int) or not 16 <= window <= self.n_ctx:
            raise ValueError(f"`window` has to be an integer in [16, {self.n_ctx}], but is {window!r}")
        if pairs <= self._pairs and window == self.window:
            return
        if self.free_slots != len(self._slots):
            raise LlamaCppError("cannot remake the llama.cpp context while sequences are live")
        self.window = window
        self._make_context(pairs)

    def fits(self, rows: int = 2) -> bool:
        """Whether pairs with `rows` sequences in all (2 per CFG pair, 1 at scale 1) can start
        now: each sequence has its own stream of a full window, so only free slots count."""
        return self.free_slots >= rows

    @property
    def free_slots(self) -> int:
        """Sequence slots no live pair holds (their cached tokens may serve a new pair)."""
        return sum(not s.busy for s in self._slots)

    @property
    def used_cells(self) -> int:
        """KV cells held by live pairs (0 once every pair is released: a leak check)."""
        return sum(len(s.tokens) for s in self._slots if s.busy)

    @property
    def cached_cells(self) -> int:
        """KV cells kept by free slots for the prompt cache."""
        return sum(len(s.tokens) for s in self._slots if not s.busy)

    def close(self) -> None:
        self._free_context()
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        # at interpreter exit llama.cpp's free functions would log through a ctypes callback that
        # may already be gone (a segfault after Ctrl-C); `_close_all` runs before that instead
        if sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:
            pass

    # ---- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer, with the model's own BOS/EOS convention; special tokens written
        in the text (e.g. <|im_start|>) become their ids, as in transformers' tokenizers."""
        L = self.lib
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, True)
        if n < 0:
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, True)
        if n < 0:
            raise LlamaCppError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(buf[:n])

    def piece_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token as text continues (a SentencePiece word start keeps its space);
        control tokens are empty unless `special`."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            if not 0 <= token < self.n_vocab:
                raise ValueError(f"`token` has to be in [0, {self.n_vocab}), but is {token}")
            buf = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece

    def decoder(self, context_ids: Sequence[int] = ()) -> ByteDecoder:
        return ByteDecoder(self.piece_bytes)

    # ---- decoding --------------------------------------------------------------------------

    def run(self, steps=(), new=()):
        """The next token of every pair in `steps` [(pair, token)] and the prompts of the pairs in
        `new` [(story, opposing or None)]; outputs at each sequence's last token. Returns (logits
        per step pair, new pairs). A new pair starts from the prompt cache (`open`) and the rest
        of its prompts is decoded at once (the decode loop instead `feed`s it in chunks).

        Why not everything in one llama_decode: llama.cpp's CPU kernels round differently once a
        micro-batch holds more than a few dozen tokens (measured on the default model: identical
        logits up to 34 tokens, up to 0.4 apart from 64), so a step's tokens must never share a
        decode with a joining prompt, and steps go in decodes of at most `STEP_CHUNK` tokens. Then
        a pair's logits never depend on what else runs (greedy: the same text as alone). Each new
        pair's story and opposing prompt are prefilled together in one decode of their own; all
        live pairs' steps share one decode up to STEP_CHUNK tokens (16 pairs with CFG)."""
        steps, new = list(steps), list(new)
        for pair, _ in steps:
            if not pair.live:
                raise ValueError("`step` got a released pair")
            if pair.pending:
                raise ValueError("`step` got a pair whose prompt is not all decoded yet")
        checked = [self._rows(ids) for ids in new]
        if self.free_slots < sum(len(rows) for rows in checked):
            raise LlamaCppError(f"no free llama.cpp sequence for {len(new)} more pairs "
                                f"(the context holds {self._pairs}); call reserve() first")
        full = [p for p, _ in steps if max(p.next_pos) >= self.seq_cells]
        if full:
            raise LlamaCppError(f"a sequence's {self.seq_cells} cells of the llama.cpp context are "
                                f"full ({max(full[0].next_pos)} tokens in use)")
        fresh: list[LlamaCppPair] = []
        try:
            for k, rows in enumerate(checked):
                pair = self._open_rows(rows, cache=True)
                fresh.append(pair)
                self.feed(pair, None)
                # later decodes overwrite llama.cpp's output buffer: keep a copy unless this is the last
                if steps or k < len(checked) - 1:
                    pair.logits = pair.logits.clone()
            out_steps = self._step(steps)
        except BaseException:
            # the failure contract (base.py): no new pair outlives a failed run, also the ones whose
            # own decode had succeeded before a later one failed
            for pair in fresh:
                self.release(pair)
            raise
        return out_steps, fresh

    def _rows(self, ids) -> list[list[int]]:
        """A new pair's rows, checked: non-empty, known token ids, within a sequence's cells."""
        rows = PairIds(*ids[:2]).rows()
        if any(not row for row in rows):
            raise ValueError("`prefill` got an empty token list")
        bad = [t for row in rows for t in row if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise ValueError(f"token ids have to be in [0, {self.n_vocab}), but one is {bad[0]}")
        # each sequence has its own stream of `seq_cells`: a longer prompt cannot go in
        longest = max(len(row) for row in rows)
        if longest > self.seq_cells:
            raise LlamaCppError(f"a prompt of {longest} tokens does not fit a sequence's "
                                f"{self.seq_cells} cells of the llama.cpp context")
        return [[int(t) for t in row] for row in rows]

    # ---- the prompt cache and chunked prefill ---------------------------------------------

    def open(self, ids, cache: bool = True) -> LlamaCppPair:
        """Start a pair from `ids` (story, opposing or None) without decoding anything yet: each
        row takes a free slot (`_choose_slots`), keeps the slot's cached tokens up to the first
        one that differs from its prompt, and has the rest to decode (`pair.pending`, `feed`).
        The last prompt token is always decoded again (its logits are the pair's first).
        `cache=False` (or the backend's `cache_prompt` off) decodes every prompt token.
        Failure: raises with no slot held."""
        rows = self._rows(ids)
        if self.free_slots < len(rows):
            raise LlamaCppError(f"no free llama.cpp sequence for a pair of {len(rows)} rows "
                                f"(the context holds {self._pairs}); call reserve() first")
        return self._open_rows(rows, cache)

    def _open_rows(self, rows: list[list[int]], cache: bool) -> LlamaCppPair:
        cache = cache and self.cache_prompt
        chosen = self._choose_slots(rows, cache)
        slots: list[Slot] = []
        try:
            for prompt, slot in zip(rows, chosen):
                slot.busy = True
                slots.append(slot)
                if cache:
                    self._reuse(slot, prompt)
                else:
                    self._trim(slot, 0)
        except BaseException:
            for slot in slots:
                slot.busy = False
            raise
        return LlamaCppPair(slots, rows, cache)

    def _choose_slots(self, rows: list[list[int]], cache: bool) -> list[Slot]:
        """A free slot for each row. A slot serves a row when the tokens it holds can be used for
        more than half the row (llama.cpp server's `slot_prompt_similarity` 0.5); the rows take
        the slots that serve them best TOGETHER (most cached tokens in all, then most of them in
        plain prefixes rather than after a context shift): the story and SillyTavern's negative
        prompt are alike, and a story that took the last negative prompt's slot would leave the
        new negative prompt nothing. A row no slot serves takes the least recently used free
        slot (never used first), so that one user's new story does not evict another's cache
        while older slots are free."""
        free = [s for s in self._slots if not s.busy]
        taken: list[Slot | None] = [None] * len(rows)
        if cache:
            use = {}
            for r, prompt in enumerate(rows):
                for i, slot in enumerate(free):
                    usable, prefix, _ = self._reusable(slot.tokens, prompt)
                    if usable > 0 and 2 * usable > len(prompt):
                        use[r, i] = (usable, prefix)
            best, best_key = None, (0, 0)
            for picks in itertools.permutations(range(len(free)), len(rows)):
                gains = [use.get((r, i), (0, 0)) for r, i in enumerate(picks)]
                key = (sum(g[0] for g in gains), sum(g[1] for g in gains))
                if key > best_key:
                    best, best_key = picks, key
            if best is not None:
                taken = [free[i] if (r, i) in use else None for r, i in enumerate(best)]
        rest = sorted((s for s in free if s not in taken), key=lambda s: s.used_at)
        return [slot if slot is not None else rest.pop(0) for slot in taken]

    def _reusable(self, cached: list[int], prompt: list[int]) -> tuple[int, int, int]:
        """(cached tokens a prompt can use, their common prefix, the hole after it): the prefix,
        and with context shift a run of the cached tokens after a hole that continues the
        prompt (`find_hole`). Never the prompt's last token: it is always read."""
        prefix = common_prefix(cached, prompt)
        hole = run = 0
        if self.context_shift and prefix < len(prompt) - 1:
            hole, run = find_hole(cached, prompt, prefix)
        return min(prefix + run, len(prompt) - 1), prefix, hole

    def _reuse(self, slot: Slot, prompt: list[int]) -> None:
        """Keep what the slot's cells share with `prompt`: its common prefix, with context shift
        also the run after a hole (the hole's cells removed, the run's moved down to close it),
        and remove the rest."""
        usable, prefix, hole = self._reusable(slot.tokens, prompt)
        if hole and not self._shift(slot, prefix, hole):
            usable = min(prefix, len(prompt) - 1)
        self._trim(slot, usable)

    def _shift(self, slot: Slot, start: int, hole: int) -> bool:
        """Remove the slot's cells at positions [start, start + hole) and move the ones after them
        `hole` positions down (llama.cpp re-rotates their keys' RoPE at the next decode);
        False, with nothing changed, where the model's memory cannot shift."""
        L = self.lib
        if not L.llama_memory_seq_rm(self.memory, slot.seq, start, start + hole):
            return False
        L.llama_memory_seq_add(self.memory, slot.seq, start + hole, -1, -hole)
        del slot.tokens[start:start + hole]
        self.shifted_tokens += hole
        self._shift_pending = True
        return True

    def _trim(self, slot: Slot, keep: int) -> None:
        """Remove the slot's cells from position `keep` on (all of them where llama.cpp cannot
        remove a part, e.g. a recurrent model's state)."""
        if keep >= len(slot.tokens):
            return
        if keep == 0 or not self.lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
            keep = 0
        del slot.tokens[keep:]

    def feed(self, pair: LlamaCppPair, budget: int | None) -> int:
        """Decode up to `budget` more prompt tokens of `pair` (None: all of them); how many were
        decoded. Each row's last prompt token waits for the decode that finishes the pair, which
        outputs the rows' logits together (`pair.logits`); the decodes before it output nothing.
        Before reading, a row takes what another slot already holds of its prompt (`_borrow`).
        Failure: raises; the pair stays live (the caller releases it) and its slots record only
        the decodes that succeeded."""
        if not pair.live:
            raise ValueError("`feed` got a released pair")
        if budget is not None:
            return self._feed_piece(pair, max(1, budget))
        read = 0
        while pair.pending:
            read += self._feed_piece(pair, None)
        return read

    def _feed_piece(self, pair: LlamaCppPair, budget: int | None) -> int:
        """One llama_decode of `feed`: the rest of the prompts when it fits `budget` (and no row
        waits for another, `_waiting`), else up to `budget` tokens of the rows' bodies."""
        waiting = self._waiting(pair) if pair.cache else set()  # (pair.cache holds cache_prompt)
        borrowed = self._borrow(pair, waiting) if pair.cache else []
        try:
            return self._read_piece(pair, budget, waiting)
        except BaseException:
            # the copies were never made, and a later decode would make them from whatever the
            # donors hold then: these slots hold nothing
            for slot in borrowed:
                self._trim(slot, 0)
            raise

    def _read_piece(self, pair: LlamaCppPair, budget: int | None, waiting: AbstractSet[int] = frozenset()) -> int:
        """The decode of `_feed_piece`; rows in `waiting` read nothing in it."""
        rest = [p[len(s.tokens):] for s, p in zip(pair.slots, pair.prompts)]
        total = sum(len(r) for r in rest)
        if total == 0:
            return 0
        if not waiting and (budget is None or total <= budget):
            entries = [(s.seq, r, len(s.tokens), True) for s, r in zip(pair.slots, rest) if r]
            view = self._decode(entries)
            for (s, r) in zip(pair.slots, rest):
                s.tokens.extend(r)
            # rows whose prompt was all cached but the last token are in `entries` too (it is
            # always decoded again), so every row has its output, in row order
            pair.logits = view
            self.prefilled_tokens += total
            return total
        entries, taken = [], 0
        for row, (s, r) in enumerate(zip(pair.slots, rest)):
            body = [] if row in waiting else r[:-1][:budget - taken if budget is not None else None]
            if body:
                entries.append((s.seq, body, len(s.tokens), False))
                taken += len(body)
        if not entries:  # only last tokens left, more rows than budget: finish anyway
            return self._read_piece(pair, None)
        self._decode(entries)
        for seq, body, _, _ in entries:
            next(s for s in pair.slots if s.seq == seq).tokens.extend(body)
        self.prefilled_tokens += taken
        return taken

    def _borrow(self, pair: LlamaCppPair, waiting: AbstractSet[int]) -> list[Slot]:
        """Each row with prompt still to read takes a longer prefix of it from another slot, when
        one holds at least COPY_MIN tokens more of it than the row's own slot: another request's
        (busy or free: the same story sent twice at once, a swipe while the first still runs) or
        its own pair's other row (SillyTavern's negative prompt is the story with one line
        inserted near its end, so it shares most of the story's tokens). llama.cpp copies the
        donor's whole KV stream into the row's (`llama_memory_seq_cp`, done at the next decode;
        a split cache copies only whole streams), then the cells after the shared prefix go.
        A cell's keys and values depend only on the tokens up to it, so the copy holds what
        reading the prefix again would: bit for bit in the deterministic mode (tested). Not
        while a context shift's re-rotation of keys waits for the next decode, nor for a row
        that `_waiting` holds back. Returns the slots that took cells (their copy is made by the
        next decode)."""
        if self._shift_pending:
            return []
        borrowed: list[Slot] = []
        for row, (slot, prompt) in enumerate(zip(pair.slots, pair.prompts)):
            if row in waiting:  # its pair's other row will have more of it
                continue
            have, limit = len(slot.tokens), len(prompt) - 1  # the last token is always read
            best, donor = have + COPY_MIN - 1, None
            for other in self._slots:  # (not a stream whose own copy waits for the decode)
                if other is not slot and other not in borrowed and len(other.tokens) > best:
                    shared = min(common_prefix(other.tokens, prompt), limit)
                    if shared > best:
                        best, donor = shared, other
            if donor is None:
                continue
            self.lib.llama_memory_seq_cp(self.memory, donor.seq, slot.seq, -1, -1)
            slot.tokens[:] = donor.tokens
            borrowed.append(slot)
            self._trim(slot, best)
            got = len(slot.tokens) - have
            if got > 0:
                pair.cached_rows[row] += got
                self.copied_tokens += got
        pair.cached = pair.cached_rows[0]
        return borrowed

    def _waiting(self, pair: LlamaCppPair) -> set[int]:
        """Rows that read nothing yet because an earlier row of the pair is still reading at
        least COPY_MIN tokens that they share (the story, for a negative prompt that repeats
        it): they take those cells from it once it has (`_borrow`) instead of reading them too."""
        waiting = set()
        for row in range(1, len(pair.slots)):
            mine = pair.slots[row]
            for earlier, shared in enumerate(pair.shared[row]):
                if shared - len(mine.tokens) >= COPY_MIN and len(pair.slots[earlier].tokens) < shared:
                    waiting.add(row)
        return waiting

    # ---- decoding --------------------------------------------------------------------------

    def _step(self, steps) -> list[torch.Tensor]:
        """One token into every row of each step pair, in decodes of at most STEP_CHUNK tokens."""
        out_steps = []
        chunk: list = []
        for i, (pair, token) in enumerate(steps):
            chunk.append((pair, int(token)))
            tokens = sum(p.rows for p, _ in chunk)
            end = i == len(steps) - 1
            if end or tokens + steps[i + 1][0].rows > STEP_CHUNK:
                view = self._decode([(s.seq, (tok,), len(s.tokens), True) for p, tok in chunk
                                     for s in p.slots])
                j = 0
                for p, tok in chunk:
                    for s in p.slots:
                        s.tokens.append(tok)
                    p.logits = view[j:j + p.rows] if end else view[j:j + p.rows].clone()
                    j += p.rows
                    out_steps.append(p.logits)
                chunk = []
        return out_steps

    def _decode(self, entries) -> torch.Tensor:
        """One llama_decode of [(sequence id, token ids, first position, output?)], an output at
        the last token of each entry that asks for one; those outputs as an (outputs, vocab)
        zero-copy view in entry order (a copy where the entries had to be put in sequence order).

        The batch goes to llama.cpp in ascending sequence order: with one KV stream per sequence,
        a batch in another order (a pair whose story has the higher sequence id, as the least
        recently used slots often give it) decoded ~10 % slower on the default model (measured:
        a bare two-sequence step 30.9-32.9 ms with the story on sequence 0, 33.7-37.9 ms with it
        on sequence 1 and first in the batch); the logits are the same."""
        L = self.lib
        tok, pos, out, ptrs = self._tok, self._pos, self._out, self._seq_ptrs
        order = sorted(range(len(entries)), key=lambda i: entries[i][0])  # stable
        if order == list(range(len(entries))):
            order = None
        else:
            entries = [entries[i] for i in order]
        n = outputs = 0
        for seq, ids, start, output in entries:
            k = len(ids)
            tok[n:n + k] = ids
            pos[n:n + k] = np.arange(start, start + k, dtype=np.int32)
            out[n:n + k] = 0
            if output:
                out[n + k - 1] = 1
                outputs += 1
            for i in range(n, n + k):
                ptrs[i][0] = seq
            n += k
        self._batch.n_tokens = n
        ret = L.llama_decode(self.ctx, self._batch)
        if ret != 0:
            raise LlamaCppError(f"llama_decode failed with code {ret} (1: the context is full)")
        self.forwards += 1
        self._shift_pending = False
        if not outputs:
            return None
        # llama.cpp stores the outputs in batch order: output j is the j-th flagged token. The
        # buffer moves only when llama.cpp reallocates it: the view is made again only then (making
        # it costs about as much as the rest of a step's bookkeeping together)
        base = L.llama_get_logits(self.ctx)
        key = (ctypes.cast(base, ctypes.c_void_p).value, outputs)
        if self._logits_view is None or self._logits_view[0] != key:
            self._logits_view = (key, torch.from_numpy(np.ctypeslib.as_array(base, shape=(outputs, self.n_vocab))))
        view = self._logits_view[1]
        if order is None:
            return view
        # the outputs came in sequence order: give them back in the caller's entry order
        flagged = [i for i, entry in zip(order, entries) if entry[3]]  # caller's index of each output row
        return view[sorted(range(len(flagged)), key=flagged.__getitem__)]

    def rewind(self, pair: LlamaCppPair, n: int) -> torch.Tensor:
        """Take the last `n` tokens back from every row of the pair; the logits at the new last
        position (rows, vocab), also as `pair.logits`.

        The rewound positions and the last kept one leave both sequences (`llama_memory_seq_rm`)
        and the slots' records (so the prompt cache never offers a rewound token), and the last
        kept token is decoded again in a decode of its own: llama.cpp keeps no logits of earlier
        positions, and one token decoded at its position onto the same cells gives what the step
        that first decoded it gave (a copy of every step's logits, kept in case, would cost a
        vocabulary-sized copy per step for a rare event). Call it after every pair of the step
        has read its logits (the decode reuses llama.cpp's output buffer)."""
        if not pair.live:
            raise ValueError("`rewind` got a released pair")
        if pair.pending:
            raise ValueError("`rewind` got a pair whose prompt is not all decoded yet")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < min(pair.next_pos):
            raise ValueError(f"`n` has to be an integer in [0, {min(pair.next_pos) - 1}], but is {n!r}")
        kept = [len(s.tokens) - n for s in pair.slots]
        last = [s.tokens[k - 1] for s, k in zip(pair.slots, kept)]
        for slot, k in zip(pair.slots, kept):
            self._trim(slot, k - 1)
            if len(slot.tokens) != k - 1:  # the model's memory cannot drop a part (recurrent)
                raise LlamaCppError("this model's memory cannot take tokens back")
        pair.logits = self._decode([(s.seq, (t,), k - 1, True) for s, t, k in zip(pair.slots, last, kept)])
        for slot, t in zip(pair.slots, last):
            slot.tokens.append(t)
        return pair.logits

    def release(self, pair: LlamaCppPair) -> None:
        """Free the pair's slots (idempotent). Their tokens stay in the KV cache for the prompt
        cache: the next pair that starts with them decodes only what follows."""
        if not pair.live:
            return
        pair.live = False
        pair.logits = None
        if not self.ctx:  # closed (e.g. at exit, before a generator's cleanup): nothing to free
            return
        self._clock += 1
        for slot in pair.slots:
            slot.busy = False
            slot.used_at = self._clock
