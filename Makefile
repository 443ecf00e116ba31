# The two commands a new user runs: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.knowstack-installed
RAY_STAMP := $(VENV)/.knowstack-ray-installed

.PHONY: demo registry-demo test test-slow lint bench browser clean docs-numbers docs-families

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build first, so that no other requirement pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The tests also need the ray extra (the Ray executor's tests run in CI); the demo does not.
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(RAY_STAMP)

demo: $(STAMP)
	$(BIN)/knowstack demo   # its last line: the path of runs/demo/report.html

# The collaborative registry's scenario (examples/registry-scenario.sh) on the quick built-in world.
registry-demo: $(STAMP)
	KNOWSTACK=$(BIN)/knowstack PYTHON=$(BIN)/python examples/registry-scenario.sh runs/registry-scenario quick

# The figures README.md and docs/ quote, rewritten in their marked blocks from the runs that measured them
# (after `make demo` and `make registry-demo`); a results dir that is missing is an error.
DOCS_RUNS ?= --demo runs/demo --registry runs/registry-scenario/registry --memory tests/fixtures/configs/llama-3-8b --vocabulary --claims
docs-numbers: $(STAMP)
	$(BIN)/python scripts/docs_numbers.py $(DOCS_RUNS)

# The families x features table of docs/families.md, from a run of tests/test_families.py.
docs-families: $(STAMP)
	mkdir -p runs
	KNOWSTACK_FAMILIES_JSON=runs/families.json $(BIN)/python -m pytest -q tests/test_families.py
	$(BIN)/python scripts/docs_numbers.py --families runs/families.json

test: $(RAY_STAMP) browser
	$(BIN)/python -m pytest -q

# The report's test opens report.html in headless Chromium: install it from the system packages where
# apt-get can (root, or sudo without a password); elsewhere that one test says why it is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "no apt-get: install chromium and chromedriver yourself"; \
	else SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if [ -n "$$SUDO" ] && ! sudo -n true 2>/dev/null; then echo "not root: skipping the chromium install"; \
	  else $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; } || \
	    echo "could not install chromium: the browser test will be skipped"; fi; fi

test-slow: $(RAY_STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/merge.py   # creates mergekit's own venv on first use
	$(BIN)/python benchmarks/olora_overhead.py
	$(BIN)/python benchmarks/registry_records.py

clean:
	rm -rf $(VENV) runs
