# Entry points for a fresh CPU machine. Two environments:
#   .venv         the pinned set in requirements/lock.txt (transformers at the low end of pyproject.toml's range);
#                 `make test` (ruff + the whole suite) runs here.
#   .venv-newest  the same lock, then transformers, accelerate and peft upgraded to the newest releases the
#                 registry serves (within pyproject.toml's range); `make test-newest` runs the model tests here.
# torch is always installed first and pinned: a looser requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
TORCH := torch==2.13.0
LOCK := requirements/lock.txt
VENV := .venv
STAMP := $(VENV)/.installed
NEWEST := .venv-newest
NEWEST_STAMP := $(NEWEST)/.installed
# The lower bound of `transformers>=X,<Y` in pyproject.toml's dependencies.
TRANSFORMERS_FLOOR := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\)[,"].*/\1/p' pyproject.toml)
# Model, generation, checkpoint, conversion and shared integration tests, plus every tests/test_hf_*.py (the transformers contract).
NEWEST_TESTS := tests/test_attn_stream.py tests/test_palimpsa_model.py tests/test_palimpsa_op.py tests/test_integration.py \
	tests/test_checkpoints.py tests/test_convert_mamba2.py $(sort $(wildcard tests/test_hf_*.py))
VERSIONS := import importlib.metadata as m; \
	print("versions:", ", ".join(p + " " + m.version(p) for p in ("transformers", "accelerate", "peft", "torch")))

.PHONY: setup setup-newest demo test test-newest lint lock

$(STAMP): $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -r $(LOCK)
	$(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/pip check
	touch $(STAMP)

setup: $(STAMP)

# The lock first, so everything the upgrade does not touch stays at its pinned version.
$(NEWEST_STAMP): $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q $(TORCH)
	$(NEWEST)/bin/pip install -q -r $(LOCK)
	$(NEWEST)/bin/pip install -q --no-deps -e .
	echo "$(TORCH)" > $(NEWEST)/constraints.txt
	touch $(NEWEST_STAMP)

# Runs the upgrade every time: "newest" means what the registry serves now. `-e .` is part of the request so
# pip keeps transformers inside pyproject.toml's range; the constraint keeps torch at the CPU wheel. A release
# whose dependencies the registry does not serve is skipped by pip's resolver (the next newest is installed).
setup-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/pip install -q -U -c $(NEWEST)/constraints.txt -e . transformers accelerate peft
	$(NEWEST)/bin/pip check
	@$(NEWEST)/bin/python -c '$(VERSIONS)'
	@listed=$$($(NEWEST)/bin/pip index versions transformers 2>/dev/null | sed -n '1s/.*(\(.*\)).*/\1/p'); \
	got=$$($(NEWEST)/bin/python -c 'import importlib.metadata as m; print(m.version("transformers"))'); \
	if [ -n "$$listed" ] && [ "$$listed" != "$$got" ]; then \
	  echo "note: the registry lists transformers $$listed, but it does not resolve here (a dependency the registry" \
	    "does not serve, or outside pyproject.toml's range); testing $$got, the newest that does."; \
	fi

# Regenerate requirements/lock.txt (needs the registry): a fresh temporary venv, torch pinned first, then `.[dev]`
# resolved in one go together with transformers==<the range's lower bound>. The lock pins the LOW end of the range
# on purpose: `make test` proves the oldest transformers we declare still works, and .venv-newest / `make
# test-newest` prove the newest one does; a lock at the newest release would leave the floor untested.
lock:
	@test -n "$(TRANSFORMERS_FLOOR)" || { echo "no transformers>= lower bound found in pyproject.toml" >&2; exit 1; }
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	echo "$(TORCH)" > "$$tmp/constraints.txt"; \
	"$$tmp/venv/bin/pip" install -q $(TORCH); \
	"$$tmp/venv/bin/pip" install -q -c "$$tmp/constraints.txt" -e ".[dev]" "transformers==$(TRANSFORMERS_FLOOR)"; \
	"$$tmp/venv/bin/pip" check; \
	mkdir -p $(dir $(LOCK)); \
	{ echo "# Every package \`pip install -e \".[dev]\"\` pulls in, pinned (amformers itself excluded)."; \
	  echo "# Made by \`make lock\`: a fresh venv ($$("$$tmp/venv/bin/python" -V), $$(uname -m) Linux), $(TORCH) installed first"; \
	  echo "# (CPU wheel), then \".[dev]\" resolved from the registry together with transformers==$(TRANSFORMERS_FLOOR), the lower"; \
	  echo "# bound of pyproject.toml's range (\`make test-newest\` covers the top end), checked with \`pip check\`, then"; \
	  echo "# \`pip freeze --exclude amformers\` (torch written without its +cpu local label)."; \
	  echo "# Refresh: make lock"; \
	  "$$tmp/venv/bin/pip" freeze --exclude amformers | sed 's/^torch==.*/$(TORCH)/'; \
	} > "$(LOCK).tmp"; \
	mv "$(LOCK).tmp" $(LOCK); \
	echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages, $$(grep -i '^transformers==' $(LOCK))"

demo: $(STAMP)
	$(VENV)/bin/python examples/quickstart.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

test-newest: setup-newest
	$(NEWEST)/bin/python -m pytest -q $(NEWEST_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
