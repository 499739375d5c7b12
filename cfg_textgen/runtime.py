"""How the model runs: the runtime settings of a backend, checked in one place, and the process-wide
settings (torch's threads) decided once, at start-up.

    settings = RuntimeSettings(threads=8, ctx_size=8192, cache_type_k="q8_0", cache_type_v="q8_0")
    backend = load_backend("model.gguf", runtime=settings)       # models.py

The fields follow llama.cpp's own flags (`llama-server --threads --threads-batch --ctx-size
--n-gpu-layers --flash-attn --cache-type-k --cache-type-v`) and its context parameters
(`n_threads`, `n_threads_batch`, `n_ctx`, `n_gpu_layers`, `flash_attn_type`, `type_k`, `type_v`).
A field's error names the field (`RuntimeSettingsError.field`); the command line turns it into the
flag `--` + field with `-` for `_`.

`deterministic` keeps a request's text independent of what else runs (batch invariance): lone
single-token decodes run on one llama.cpp thread, as in a crowd (see backends/llama_cpp.py). The
default runs them on all `threads`, faster on a writer's many-core machine; its drift from the
deterministic mode is stated in the README (benchmarks/bench_drift.py measures it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import CFGTextgenError

# llama.cpp's KV cache types (common/arg.cpp's list for --cache-type-k/-v) -> ggml type id
CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20,
               "q5_0": 6, "q5_1": 7}
# bytes per stored value: a block's bytes over its 32 values for the quantized types (ggml-common.h)
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
                    "q4_1": 20 / 32, "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
QUANTIZED_BLOCK = 32  # values per block of every quantized cache type: a head size must divide by it
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


class RuntimeSettingsError(CFGTextgenError, ValueError):
    """A runtime setting out of range, or a combination llama.cpp refuses; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _positive(name: str, value, least: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise RuntimeSettingsError(name, f"`{name}` has to be an integer >= {least}, but is {value!r}")


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the model runs. Every field's default is llama.cpp's own or the model's.

    Args:
        threads: CPU threads for generating (llama.cpp `n_threads`; on transformers, torch's
            threads). None: the physical cores.
        threads_batch: CPU threads for prompt processing (`n_threads_batch`). None: `threads`.
        ctx_size: the context window of one sequence in tokens (>= 16). None: the model's
            training context, at most 4096.
        n_gpu_layers: layers offloaded to the GPU; -1 all, 0 none (llama.cpp needs a GPU build;
            on transformers any value > 0 puts the whole model on CUDA).
        flash_attn: "auto", "on" or "off". auto: off on a CPU-only run in the default mode, else
            llama.cpp decides (`flash_attn_type`).
        cache_type_k, cache_type_v: the KV cache's value types (`CACHE_TYPES`); a quantized V
            cache needs flash attention, which llama.cpp refuses to turn off for it.
        deterministic: a request's text does not depend on what else runs (batch invariance);
            costs lone-sequence speed (see the module docstring).
        cache_prompt: llama.cpp: a new request starts from the cached tokens of an earlier one
            that share its beginning and decodes only the rest (llama.cpp's `--cache-prompt`,
            on by default; a request's `cache_prompt: false` turns it off for that request).
        context_shift: llama.cpp: when a story outgrew the window and lost its oldest tokens, the
            cache drops them too and moves the rest down instead of reading it all again
            (KoboldCpp's ContextShift; llama.cpp's `--context-shift`). Off in the deterministic
            mode: the kept tokens' cells were computed with the dropped ones in view.
        batch_size: llama.cpp: prompt tokens decoded at once while other requests stream (>= 1;
            llama.cpp's `--batch-size`): a long prompt is read in pieces of this size between
            their steps, and a cancelled one stops within one piece.
        ubatch_size: llama.cpp: the micro-batch of its kernels (llama.cpp's `--ubatch-size`).
            None: 512, and 32 in the deterministic mode: micro-batches of 32 tokens round a
            prompt read exactly like token-by-token decoding, so a prompt read in one piece,
            in chunks or after a cached prefix gives the same logits (prompt reads ~2x slower).
    """

    threads: int | None = None
    threads_batch: int | None = None
    ctx_size: int | None = None
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    deterministic: bool = False
    cache_prompt: bool = True
    context_shift: bool = True
    batch_size: int = 512
    ubatch_size: int | None = None

    def __post_init__(self):
        _positive("threads", self.threads)
        _positive("threads_batch", self.threads_batch)
        _positive("ctx_size", self.ctx_size, least=16)
        _positive("n_gpu_layers", self.n_gpu_layers, least=-1)
        _positive("batch_size", self.batch_size)
        _positive("ubatch_size", self.ubatch_size)
        if self.flash_attn not in FLASH_ATTN:
            raise RuntimeSettingsError("flash_attn", f"`flash_attn` has to be one of "
                                       f"{', '.join(FLASH_ATTN)}, but is {self.flash_attn!r}")
        for name in ("cache_type_k", "cache_type_v"):
            if getattr(self, name) not in CACHE_TYPES:
                raise RuntimeSettingsError(name, f"`{name}` has to be one of {', '.join(CACHE_TYPES)}, "
                                           f"but is {getattr(self, name)!r}")
        # llama_init_from_model: "quantized V cache requires flash_attn to be enabled"
        if self.v_quantized and self.flash_attn == "off":
            raise RuntimeSettingsError("cache_type_v", f"a quantized V cache ({self.cache_type_v}) "
                                       f"needs flash attention: leave flash attention on or auto, or "
                                       f"keep the V cache at f16")
        for name in ("deterministic", "cache_prompt", "context_shift"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeSettingsError(name, f"`{name}` has to be true or false, "
                                           f"but is {getattr(self, name)!r}")

    @property
    def micro_batch(self) -> int:
        """llama.cpp's `n_ubatch`: `ubatch_size`, else 32 in the deterministic mode, else 512."""
        if self.ubatch_size is not None:
            return self.ubatch_size
        return 32 if self.deterministic else 512

    @property
    def flash_attn_type(self) -> int:
        """llama.cpp's `flash_attn_type` for `flash_attn`. "auto" is OFF on a CPU-only run in the
        default mode: there ggml's CPU flash attention is slower than plain attention except for
        long prompt reads (measured, README: 1,500 tokens into a story on the 7B shape, a CFG pair's
        step and a turn's 41-token read each took ~1.5x as long with it), and llama-cpp-python's
        own server runs without it. Everywhere else "auto" is llama.cpp's: with GPU layers, with a quantized KV
        cache (a quantized V cache requires it), and in the deterministic mode (its exactness
        checks rest on flash attention: plain attention rounds a prompt read in one batch
        differently from token-by-token steps)."""
        if self.flash_attn == "auto" and self.n_gpu_layers == 0 and not self.deterministic \
                and not self.k_quantized and not self.v_quantized:
            return FLASH_ATTN["off"]
        return FLASH_ATTN[self.flash_attn]

    @property
    def v_quantized(self) -> bool:
        return self.cache_type_v not in ("f32", "f16", "bf16")

    @property
    def k_quantized(self) -> bool:
        return self.cache_type_k not in ("f32", "f16", "bf16")

    def replace(self, **changes) -> "RuntimeSettings":
        return dataclasses.replace(self, **changes)

    def llama_only(self) -> list[str]:
        """The fields set away from their defaults that only the llama.cpp backend uses."""
        default = RuntimeSettings()
        return [name for name in ("threads_batch", "flash_attn", "cache_type_k", "cache_type_v",
                                  "batch_size", "ubatch_size")
                if getattr(self, name) != getattr(default, name)]


def kv_cell_bytes(n_layer: int, n_head_kv: int, head_k: int, head_v: int, settings: RuntimeSettings) -> float:
    """Bytes one KV cell (one token of one sequence) takes: every layer's key and value heads at
    the cache types' sizes, n_layer * n_head_kv * (head_k * size(K) + head_v * size(V))."""
    return n_layer * n_head_kv * (head_k * CACHE_TYPE_BYTES[settings.cache_type_k]
                                  + head_v * CACHE_TYPE_BYTES[settings.cache_type_v])


def configure_process(backend_name: str, settings: RuntimeSettings | None = None) -> None:
    """The process-wide settings, decided once, at start-up, before the model loads.

    torch's intra-op thread count is one number for the process (threads that have not yet run a
    parallel region take it when they do, the decode thread included), so it is set here and
    nowhere else. On llama.cpp torch only combines and samples one or two vocabulary rows per
    pair and step: one thread (its pool gains nothing on ~50k values and its waiting threads take
    cores from llama.cpp's). On transformers torch runs the model: `threads`, else torch's default.

    OpenMP's waiting (OMP_WAIT_POLICY, shared by torch and llama.cpp's ggml threads) is left to
    the OpenMP runtime and the user: forcing `passive` halved llama.cpp's decoding on a quiet
    machine (bare llama.cpp on the default model, 2 cores: 121 -> 42 tokens/s), while on cores
    shared with other work `OMP_WAIT_POLICY=passive` helps (set it in the environment).
    """
    import torch

    settings = settings or RuntimeSettings()
    if backend_name == "llama.cpp":
        torch.set_num_threads(1)
    elif settings.threads is not None:
        torch.set_num_threads(settings.threads)
