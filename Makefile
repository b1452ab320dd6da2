# Two commands do all the set-up on a fresh machine:
#   make demo   compile a real model cold, then as a fresh machine served from castore (embedded file:// store)
#   make test   the whole test suite, starting its own SeaweedFS S3 server on 127.0.0.1
VENV ?= .venv
PYTHON ?= python3
# torch 2.13.0 is the CPU wheel CI uses; any torch >= 2.11 works (TORCH_SPEC='torch>=2.11' on a GPU box).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/castore demo

# Azurite (the Azure Blob emulator, from the npm registry) for the az:// tests; they skip, saying why, without npm.
node_modules/.bin/azurite-blob:
	-command -v npm >/dev/null && npm install --no-save --no-audit --no-fund --silent azurite

test: install node_modules/.bin/azurite-blob
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python benchmarks/store_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
