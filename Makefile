# The two commands a new user runs: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.knowstack-installed
RAY_STAMP := $(VENV)/.knowstack-ray-installed

.PHONY: demo registry-demo test test-slow test-kernels lint lock bench browser clean docs-numbers docs-families

# Every dependency comes from a lock (requirements/, written by `make lock`), with hashes, and no requirement is
# resolved at install time (--no-deps): the same packages on every machine. torch is the exception: it is
# installed by version from pip's configured index (a CPU build where pip's config points at one, as on the
# machines the numbers were measured on), after the lock, whose packages already satisfy its requirements.
# Elsewhere pick the CPU build's index yourself: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
LOCK := requirements/lock.txt
RAY_LOCK := requirements/lock-ray.txt

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

# The tests also need the ray extra (the Ray executor's tests run in CI); the demo does not.
$(RAY_STAMP): $(STAMP) $(RAY_LOCK)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(RAY_LOCK)
	$(BIN)/pip check
	touch $(RAY_STAMP)

# Refresh the lock after changing pyproject.toml's dependencies: `make lock` (it keeps the pins that still fit;
# `make lock LOCK_UPGRADE=--upgrade` takes the newest releases). Both files come from PyPI, resolved for this
# Python on this platform (the committed ones: CPython 3.11, Linux x86_64), with every file's hash. The ray lock
# is resolved first and the other within it, so the two agree. torch's own requirements are read from its CPU
# build (LOCK_TORCH: where that lies; PyPI's CUDA build would add nvidia-* packages); torch is left out of both.
UV := uv==0.13.9
LOCK_TORCH ?= --find-links /opt/wheels
LOCK_VENV := .venv-lock
LOCK_UPGRADE ?=
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(UV)
	echo "$(firstword $(TORCH))+cpu" > $(LOCK_VENV)/torch.txt
	$(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml requirements/tools.in --extra dev --extra ray \
	  --generate-hashes --custom-compile-command 'make lock' $(LOCK_TORCH) -c $(LOCK_VENV)/torch.txt --no-emit-package torch $(LOCK_UPGRADE) -o $(RAY_LOCK)
	$(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml requirements/tools.in --extra dev \
	  --generate-hashes --custom-compile-command 'make lock' $(LOCK_TORCH) -c $(LOCK_VENV)/torch.txt -c $(RAY_LOCK) --no-emit-package torch -o $(LOCK)

demo: $(STAMP)
	$(BIN)/knowstack demo   # its last line: the path of runs/demo/report.html

# The collaborative registry's scenario (examples/registry-scenario.sh) on the quick built-in world.
registry-demo: $(STAMP)
	KNOWSTACK=$(BIN)/knowstack PYTHON=$(BIN)/python examples/registry-scenario.sh runs/registry-scenario quick

# The figures README.md and docs/ quote, rewritten in their marked blocks from the runs that measured them
# (after `make demo`, `make registry-demo`, `knowstack study configs/builtin-search.yaml --out runs/search` and the
# demo on two kernel paths, runs/demo-default and runs/demo-avx2: docs/builtin-world.md); a results dir that is
# missing is an error: name the runs you have, e.g. make docs-numbers DOCS_RUNS="--demo runs/demo".
DOCS_RUNS ?= --demo runs/demo --verdicts runs/demo-default runs/demo-avx2 --registry runs/registry-scenario/registry --search runs/search --memory tests/fixtures/configs/llama-3-8b --vocabulary --claims --merge-options
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

# The suite on another kernel path: torch's and oneDNN's AVX2 kernels, as on a CPU without AVX-512 (the default),
# or any other variables (KERNEL_PATH="MKL_CBWR=" is MKL's own mode; TESTS= a part of the suite). CI runs both.
KERNEL_PATH ?= ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
TESTS ?=
test-kernels: $(RAY_STAMP) browser
	env $(KERNEL_PATH) $(BIN)/python -m pytest -q $(TESTS)

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
	rm -rf $(VENV) $(LOCK_VENV) runs
