# Two commands set up and run everything: `make demo` and `make test`.
# Both create .venv (or reuse it while requirements.txt and pyproject.toml are unchanged) first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)  ## the main job on the embedded toy default -> runs/demo/report.md
	$(BIN)/vilex demo --out runs/demo

test: $(STAMP)  ## the default (fast) test suite
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)  ## the heavier end-to-end tests too
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ""

clean-venv:
	rm -rf $(VENV)
