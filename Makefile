# Two commands from a fresh clone: `make train` (the main job) and `make test` (the test suite).
# Both first install what they need into .venv (tools/install.sh: torch 2.13.0, the CPU build
# where there is no NVIDIA GPU, then this package with its dev extras); later calls reuse it.
# Installing into your own environment keeps working: `pip install -e ".[dev]"`, then
# `python examples/train.py` and `python -m pytest -q`.
VENV ?= .venv
PY   := $(VENV)/bin/python

.PHONY: install train test clean

$(VENV)/.installed: pyproject.toml tools/install.sh
	bash tools/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

# the main job; Hydra overrides go in ARGS, e.g. make train ARGS="strategy=pipemare trainer.devices=4"
train: install
	$(PY) examples/train.py $(ARGS)

# the test suite (CPU; launches gloo processes) on 2 pytest workers, one test file per worker at a
# time, slow files first (tests/conftest.py); pytest options go in ARGS, e.g. ARGS="-k signals"
TEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder
test: install
	$(PY) -m pytest -q $(TEST_WORKERS) $(ARGS)

clean:
	rm -rf $(VENV)
