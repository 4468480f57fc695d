# The whole set-up on a fresh machine is `make demo` (a real, small training run) and `make test`.
# Both create .venv when it is missing and install what they need first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdray-installed
# CPU machines get torch's CPU build pinned first: a bare `torch` requirement resolved on a machine
# without CUDA downloads a multi-GB CUDA build (DEVELOPERS.md). GPU machines keep their own torch.
CPU_TORCH ?= torch==2.13.0
# strategy: deepspeed. Pinned to the release seen to work with torch 2.13 on CPU/gloo (ZeRO 1-3, checkpoints,
# resume). A source package whose setup.py imports torch: built without isolation against the torch above,
# with its C++ ops left to JIT compilation on first use (DS_BUILD_OPS=0).
DEEPSPEED ?= deepspeed==0.19.8
PYTEST_ARGS ?=

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: keeping the torch build pip picks for CUDA"; \
	else \
		$(PY) -m pip install -q "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED)"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sdray demo

# The default suite: everything but the runs marked slow (the full demo). < 20 min on 2 cores.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" --durations=25 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf demo-output .pytest_cache
