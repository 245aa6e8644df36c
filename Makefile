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
# Demo budget (CPU): optimizer steps for SmolLM2, epochs for MiniLM.
DEMO_LM_STEPS   ?= 12
DEMO_CLS_EPOCHS ?= 2

.PHONY: setup test test-no-shared test-slow demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create .venv with everything (tune, export, runtime, tests)

test: setup ## ruff and mypy (both configured in pyproject.toml), then the default suite: tiny random models, real int8 / export / runtime paths, CPU, minutes
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# What a fresh clone on a user's machine sees: no ../shared (the variable points nowhere).
test-no-shared: setup ## the default suite again with EDGEFT_SHARED_DATA pointing to a folder that does not exist
	EDGEFT_SHARED_DATA=/nonexistent/edgeft-shared-data $(BIN)/python -m pytest -q

test-slow: setup ## real-model tests on pulled SmolLM2-135M and MiniLM-L6
	$(BIN)/python -m pytest -q -m slow

.PHONY: runtime-check
runtime-check: setup ## edgeft's wheel with only the runtime extra in a fresh venv: no torch, and the commands run
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w "$$tmp/dist" . ; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$$(ls "$$tmp"/dist/edgeft-*.whl)[runtime]"; \
	if "$$tmp/venv/bin/python" -c 'import torch' 2>/dev/null; then echo "runtime-check: torch is importable" >&2; exit 1; fi; \
	if "$$tmp/venv/bin/python" -c 'import transformers' 2>/dev/null; then echo "runtime-check: transformers is importable" >&2; exit 1; fi; \
	for cmd in "" generate chat classify embed serve verify keygen sign; do "$$tmp/venv/bin/edgeft" $$cmd --help >/dev/null; done; \
	"$$tmp/venv/bin/python" -c 'import cryptography.hazmat.primitives.asymmetric.ed25519'; \
	"$$tmp/venv/bin/python" -c 'import edgeft.runtime, edgeft.cli.generate, edgeft.cli.chat, edgeft.cli.classify, edgeft.cli.embed'; \
	"$$tmp/venv/bin/python" -c 'from edgeft.runtime import ui; [ui.read(n) for n in ui.TYPES]; ui.routes()'; \
	echo "runtime-check: ok (no torch, no transformers; edgeft --help, generate/chat/classify/embed/serve/verify/keygen/sign --help work; signatures can be checked; the browser page ships)"

.PHONY: deploy-check
deploy-check: setup ## rehearse deploy/: wheel -> fresh runtime-only venv (no torch) -> serve real artifacts -> SIGTERM; lint Dockerfile, compose, kubernetes, systemd
	PYTHON=$(PYTHON) DEV_VENV=$(VENV) bash deploy/rehearse.sh

.PHONY: bench
bench: setup ## the benchmark suite on this CPU (~30-45 min; BENCH_QUICK=1 for minutes, BENCH_ARGS="--cases generation"): benchmarks/results/
	@echo "bench: llama.cpp is built natively on first use (python -m benchmarks.llamacpp, ~10 min; cached per CPU); OpenVINO GenAI and CTranslate2 go in their own venv (python -m benchmarks.peers)"
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

demo: setup ## pull SmolLM2-135M and MiniLM-L6, tune both on the demo data, export, run (2 CPU cores: ~10 min)
	$(EDGEFT) pull smollm2-135m-instruct
	$(EDGEFT) pull minilm-l6
	@echo "== style tuning: SmolLM2-135M on Shakespeare's sonnets, top 4 of 30 blocks over an 8-bit base"
	$(EDGEFT) tune -m smollm2-135m-instruct -d demo/sonnets.txt -o $(OUT)/runs/sonnets \
		--trainable-layers 4 --max-length 128 --batch-size 8 --max-steps $(DEMO_LM_STEPS) --lr 5e-4 --warmup 0.1 --eval-batch-size 8 --overwrite
	$(EDGEFT) export $(OUT)/runs/sonnets --quantize int8 -o $(OUT)/artifacts/sonnets --overwrite
	$(EDGEFT) generate $(OUT)/artifacts/sonnets "Shall I compare thee to a summer's day?" \
		--max-new-tokens 60 --temperature 0.8 --top-p 0.95 --seed 1 --stats
	@echo "== sentiment: MiniLM-L6 on 2,000 SST-2 reviews, top 2 of 6 blocks over an 8-bit base"
	$(EDGEFT) tune -m minilm-l6 -d demo/sst2_2k.csv -o $(OUT)/runs/sentiment \
		--trainable-layers 2 --max-length 64 --batch-size 32 --epochs $(DEMO_CLS_EPOCHS) --lr 1e-3 --warmup 0.1 --overwrite
	$(EDGEFT) export $(OUT)/runs/sentiment --quantize int8 -o $(OUT)/artifacts/sentiment --overwrite
	$(EDGEFT) classify $(OUT)/artifacts/sentiment "a gorgeous, witty, seductive movie." "the plot is a lump of coal."
	$(EDGEFT) pack $(OUT)/artifacts/sentiment -o $(OUT)/sentiment.edgeft --overwrite
	@echo "== done: artifacts in $(OUT)/artifacts; try: $(EDGEFT) chat $(OUT)/artifacts/sonnets  or  $(EDGEFT) serve $(OUT)/artifacts/*"

clean:
	rm -rf $(OUT) .pytest_cache
