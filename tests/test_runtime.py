"""Runtime settings (runtime.py, cli_options.py): one option bundle on every command that runs a
model, checked in one place (a bad value or combination is a usage error naming the flag), handed
to the backends; the process-wide settings decided once; the llama.cpp context built from them
(threads, cache types) and its KV memory as llama.cpp itself reports it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.runtime import RuntimeSettings, RuntimeSettingsError
from llamacpp_reference import default_gguf, have_llama_cpp

REPO = Path(__file__).resolve().parent.parent
needs_llama = pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")

RUNTIME_FLAGS = ["--model", "--backend", "--threads", "--threads-batch", "--ctx-size", "--n-gpu-layers",
                 "--flash-attn", "--cache-type-k", "--cache-type-v", "--deterministic"]
COMMANDS = [["write", "story.txt"], ["generate", "x"], ["sweep", "x"], ["explain", "x"],
            ["eval", "lambada", "x.jsonl"], ["serve"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_cli_model_commands_all_take_the_runtime_flags(command):
    r = CliRunner().invoke(main, command[:-1] + ["--help"] if len(command) > 1 else command + ["--help"])
    assert r.exit_code == 0, r.output
    missing = [flag for flag in RUNTIME_FLAGS if not re.search(rf"^\s+{flag}\b", r.output, flags=re.M)]
    assert missing == []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("flags, named", [
    (["--cache-type-v", "q8_0", "--flash-attn", "off"], "--cache-type-v"),
    (["--cache-type-k", "q7"], "--cache-type-k"),
    (["--ctx-size", "8"], "--ctx-size"),
    (["--n-gpu-layers", "-2"], "--n-gpu-layers"),
    (["--backend", "bogus"], "--backend"),
    (["--threads", "0"], "--threads"),
])
def test_cli_bad_runtime_setting_is_a_usage_error_naming_the_flag(tmp_path, command, flags, named):
    # before any model loads: a usage error (exit 2), no traceback
    r = CliRunner().invoke(main, command + flags, catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert f"'{named}'" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("changes, field", [
    ({"threads": 0}, "threads"),
    ({"threads_batch": True}, "threads_batch"),
    ({"ctx_size": 15}, "ctx_size"),
    ({"n_gpu_layers": -2}, "n_gpu_layers"),
    ({"flash_attn": "yes"}, "flash_attn"),
    ({"cache_type_k": "q8"}, "cache_type_k"),
    ({"cache_type_v": "q4_0", "flash_attn": "off"}, "cache_type_v"),
    ({"deterministic": 1}, "deterministic"),
])
def test_runtime_settings_errors_name_their_field(changes, field):
    with pytest.raises(RuntimeSettingsError) as err:
        RuntimeSettings(**changes)
    assert err.value.field == field and err.value.flag == "--" + field.replace("_", "-")


def test_runtime_settings_accept_what_llama_cpp_accepts():
    # quantized K without flash attention, quantized V with it (on or auto: llama.cpp turns it on)
    RuntimeSettings(cache_type_k="q8_0", flash_attn="off")
    RuntimeSettings(cache_type_k="q4_0", cache_type_v="q4_0", flash_attn="on")
    RuntimeSettings(cache_type_v="q8_0")


def test_transformers_backend_refuses_llama_cpp_only_settings(tiny_model_dir):
    r = CliRunner().invoke(main, ["generate", "Once", "--model", str(tiny_model_dir), "--tokens", "2",
                                  "--cache-type-k", "q8_0"])
    assert r.exit_code == 2, r.output
    assert "'--cache-type-k'" in r.output and "llama.cpp setting" in r.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is present")
def test_transformers_n_gpu_layers_without_cuda_is_a_usage_error(tiny_model_dir):
    r = CliRunner().invoke(main, ["generate", "Once", "--model", str(tiny_model_dir), "--tokens", "2",
                                  "--n-gpu-layers", "1"])
    assert r.exit_code == 2, r.output
    assert "'--n-gpu-layers'" in r.output and "CUDA" in r.output


def test_transformers_ctx_size_narrows_the_window(tiny_model_dir):
    from cfg_textgen.models import load_backend

    backend = load_backend(str(tiny_model_dir), runtime=RuntimeSettings(ctx_size=64))
    assert backend.n_ctx == 64


def test_importing_cfg_textgen_leaves_openmp_waiting_alone():
    """Forcing OMP_WAIT_POLICY=passive halved llama.cpp's decoding on a quiet machine: importing the
    package (and the llama.cpp backend) must not set it."""
    code = ("import os; os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "import cfg_textgen, cfg_textgen.cli, cfg_textgen.backends.llama_cpp\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr


def test_configure_process_gives_torch_one_thread_on_llama_cpp_and_threads_on_transformers():
    code = ("import threading, torch\n"
            "from cfg_textgen.runtime import RuntimeSettings, configure_process\n"
            "configure_process('transformers', RuntimeSettings(threads=2)); a = torch.get_num_threads()\n"
            "configure_process('llama.cpp', RuntimeSettings(threads=2)); b = torch.get_num_threads()\n"
            "seen = []\n"
            "t = threading.Thread(target=lambda: (torch.ones(100000).sum(), seen.append(torch.get_num_threads())))\n"
            "t.start(); t.join()\n"
            "print(a, b, seen[0])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["2", "1", "1"], r.stderr


# ---- llama.cpp ---------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("deterministic, lone", [(False, 2), (True, 1)])
def test_llama_context_lone_steps_use_all_threads_unless_deterministic(deterministic, lone):
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(default_gguf(), RuntimeSettings(threads=2, threads_batch=2, ctx_size=256,
                                                        deterministic=deterministic))
    try:
        assert (b.lib.llama_n_threads(b.ctx), b.lib.llama_n_threads_batch(b.ctx)) == (lone, 2)
    finally:
        b.close()


# llama.cpp's own report of its KV cache (llama-kv-cache.cpp), logged at INFO when a context is made
# (its size over every stream, the cells of one stream, the streams)
_KV_LOG = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, +\d+/(\d+) seqs\)")
_KV_REPORT = """
import ctypes, sys
import llama_cpp as L
from cfg_textgen.backends.llama_cpp import LlamaCppBackend
from cfg_textgen.runtime import RuntimeSettings
lines = []
cb = L.llama_log_callback(lambda level, text, data: lines.append((text or b"").decode()))
L.llama_log_set(cb, ctypes.c_void_p(0))
b = LlamaCppBackend({path!r}, RuntimeSettings(**{settings!r}), pairs={pairs}, verbose=True)
print("OURS", b.kv_bytes() / 2**20, b.cells)
print("".join(lines))
b.close()
"""


@needs_llama
@pytest.mark.parametrize("settings", [{"ctx_size": 512}, {"ctx_size": 256, "cache_type_k": "q8_0"},
                                      {"ctx_size": 256, "cache_type_k": "q4_0", "cache_type_v": "q8_0"}],
                         ids=["f16", "q8_0-k", "q4_0-k-q8_0-v"])
def test_llama_kv_bytes_equal_what_llama_cpp_reports(settings):
    code = _KV_REPORT.format(path=str(default_gguf()), settings=settings, pairs=2)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours, cells = re.search(r"OURS ([\d.]+) (\d+)", r.stdout).groups()
    theirs = _KV_LOG.search(r.stdout)
    assert theirs, r.stdout[-2000:]
    assert int(cells) == int(theirs.group(2)) * int(theirs.group(3)) == 2 * 2 * settings["ctx_size"]
    assert abs(float(ours) - float(theirs.group(1))) < 0.01


@needs_llama
def test_llama_kv_bytes_default_model_by_hand():
    """SmolLM2-135M: 30 layers, 3 KV heads of 64, K and V in f16: 30 * 3 * 64 * 2 * 2 = 23,040
    bytes per cell; two pairs of two 512-token sequences hold 2,048 cells = 45 MiB."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(default_gguf(), RuntimeSettings(ctx_size=512), pairs=2)
    try:
        assert b.cell_bytes == 23040 and b.kv_bytes() == 2048 * 23040
    finally:
        b.close()


@needs_llama
def test_llama_quantized_cache_decodes():
    """llama.cpp takes the context (a quantized V cache turns flash attention on in "auto") and
    its greedy token stays the f16 cache's on the first step."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    tokens = []
    for settings in (RuntimeSettings(ctx_size=256), RuntimeSettings(ctx_size=256, cache_type_k="q8_0",
                                                                    cache_type_v="q8_0")):
        b = LlamaCppBackend(default_gguf(), settings)
        try:
            [pair] = b.prefill([(b.tokenize("The capital of France is"), None)])
            tokens.append(int(pair.logits[0].argmax()))
        finally:
            b.close()
    assert tokens[0] == tokens[1]


@needs_llama
def test_llama_n_gpu_layers_on_a_cpu_build_names_the_flag():
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has GPU support")
    r = CliRunner().invoke(main, ["generate", "Once", "--tokens", "2", "--n-gpu-layers", "-1",
                                  "--backend", "llama.cpp"])
    assert r.exit_code == 2, r.output
    assert "'--n-gpu-layers'" in r.output and "GPU" in r.output


@needs_llama
def test_serve_prints_the_kv_memory_parallel_takes():
    from server_process import ServerProcess

    srv = ServerProcess("--parallel", "2", "--ctx-size", "512", "--backend", "llama.cpp")
    try:
        # by hand: 2 requests x 2 sequences x 512 cells x 23,040 bytes = 45 MiB
        assert re.search(r"KV cache: 45 MiB for --parallel 2 \(2 requests x 2 sequences", srv.stderr()), srv.stderr()
    finally:
        assert srv.terminate() == 0


@needs_llama
@pytest.mark.parametrize("ctx, cache_type, pairs", [
    # by hand, 23,040 bytes a cell in f16 (30 layers x 3 KV heads x 64 x 2 bytes, K and V), 46,080 in
    # f32; a pair keeps 2 windows; 2**30 bytes / (2 x ctx x cell):
    (4096, "f16", 4),  # 5.7 pairs fit: capped at 4
    (8192, "f16", 2),  # 2.8
    (8192, "f32", 1),  # 1.4
])
def test_auto_parallel_takes_as_many_pairs_as_a_gib_of_kv_cache_holds(ctx, cache_type, pairs):
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path
    from cfg_textgen.runtime import RuntimeSettings

    b = LlamaCppBackend(default_gguf_path(), RuntimeSettings(ctx_size=ctx, cache_type_k=cache_type,
                                                             cache_type_v=cache_type), pairs=None)
    try:
        assert b.pairs == pairs
        assert b.cells == 2 * pairs * ctx  # the context llama.cpp made holds them
    finally:
        b.close()


@needs_llama
def test_serve_parallel_auto_is_the_default_and_says_what_it_chose():
    from server_process import ServerProcess

    srv = ServerProcess("--ctx-size", "8192", "--backend", "llama.cpp")
    try:
        log = srv.stderr()
        assert "up to 2 requests decoded together (--parallel auto)" in log, log
        # 2 requests x 2 sequences x 8192 cells x 23,040 bytes = 720 MiB
        assert re.search(r"KV cache: 720 MiB for --parallel 2 \(2 requests x 2 sequences", log), log
    finally:
        assert srv.terminate() == 0


def test_serve_parallel_names_the_flag_when_it_is_not_a_number_or_auto():
    for bad in ("0", "two", "-1"):
        r = CliRunner().invoke(main, ["serve", "--parallel", bad])
        assert r.exit_code == 2, r.output
        assert "'--parallel'" in r.output and "auto" in r.output, r.output


@pytest.mark.parametrize("settings, expected", [
    # llama_flash_attn_type: -1 auto (llama.cpp decides), 0 off, 1 on
    ({}, 0),  # CPU only, default mode: plain attention (faster there, README)
    ({"deterministic": True}, -1),  # its exactness checks rest on flash attention
    ({"n_gpu_layers": -1}, -1),
    ({"n_gpu_layers": 10}, -1),
    ({"cache_type_k": "q8_0"}, -1),
    ({"cache_type_k": "q8_0", "cache_type_v": "q8_0"}, -1),  # a quantized V cache requires it
    ({"flash_attn": "on"}, 1),
    ({"flash_attn": "off"}, 0),
    ({"flash_attn": "on", "deterministic": True}, 1),
])
def test_flash_attention_auto_is_off_only_on_a_cpu_run_in_the_default_mode(settings, expected):
    assert RuntimeSettings(**settings).flash_attn_type == expected
