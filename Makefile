# edgeft: `make demo` runs the whole pipeline on real models; `make test` runs the tests.
# Both start from a clean clone: the first target that needs it builds .venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EDGEFT := $(BIN)/edgeft
# Where demo runs and artifacts go (ignored by git).
OUT    ?= out
# torch is pinned to the CPU build that lies on this kind of machine's disk; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU workstation install your CUDA torch first.
TORCH  ?= torch==2.13.0

.PHONY: setup test test-slow demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create .venv with everything (tune, export, runtime, tests)

test: setup ## the default suite: tiny random models, real int8 / export / runtime paths, CPU, minutes
	$(BIN)/python -m pytest -q

test-slow: setup ## real-model tests on pulled SmolLM2-135M and MiniLM-L6
	$(BIN)/python -m pytest -q -m slow

.PHONY: deploy-check
deploy-check: setup ## rehearse deploy/: wheel -> fresh runtime-only venv (no torch) -> serve real artifacts -> SIGTERM; lint Dockerfile, compose, kubernetes, systemd
	PYTHON=$(PYTHON) DEV_VENV=$(VENV) bash deploy/rehearse.sh

demo: setup ## pull SmolLM2-135M and MiniLM-L6, tune both on the demo data, export, run
	$(EDGEFT) pull smollm2-135m-instruct
	$(EDGEFT) pull minilm-l6

clean:
	rm -rf $(OUT) .pytest_cache
