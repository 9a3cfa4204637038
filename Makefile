# Every target sets up .venv itself: a fresh machine needs only Python 3.11 and this repository.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch comes first and pinned: unpinned, pip would resolve the newest CUDA build (gigabytes) on any machine.
# On a CPU-only machine outside this one, add the CPU index: make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup smoke test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

smoke: setup
	$(BIN)/masktrain smoke

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no test" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/masktrain bench

clean:
	rm -rf runs benchmarks/out .pytest_cache
