# Two commands on a fresh machine:  make demo  (set up + run the main job)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo package test test-processes test-all lint clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: every stage for the default experiment (resnet10t),
# then a second architecture (resnet18), whose ensemble step blends both into one submission.
demo: setup
	$(BIN)/python -m pipeline.run
	$(BIN)/python -m pipeline.run --config configs/digits_resnet18.yaml

# Code competitions: package the newest blend (after make demo) for offline inference, then rehearse it:
# a fresh venv without an index, the package's notebook on the test images x2, projected to 10,000 images.
package: setup
	$(BIN)/python -m pipeline.package --rehearse --force --scale 2 --hidden-size 10000 --limit 9h

# One pytest worker per logical core (at most 4): the tests run torch on one thread each. Whole
# modules go to a worker (loadscope), so a module's expensive fixtures are built once; the
# longest modules are handed out first (tests/conftest.py orders them).
TEST_WORKERS = -n logical --maxprocesses=4 --dist loadscope

# make test: the fast suite, for every change. Tests that start fresh Python processes importing torch
# (about 6 s of imports each: torchrun DDP, notebook kernels, the fold launcher) are marked `processes`
# and run by make test-processes; CI (.ci/run) runs both. make test-all adds the `slow` tests.
test: setup
	$(BIN)/python -m pytest -q -m "not slow and not processes" $(TEST_WORKERS)

test-processes: setup
	$(BIN)/python -m pytest -q -m "processes and not slow" $(TEST_WORKERS)

test-all: setup
	$(BIN)/python -m pytest -q $(TEST_WORKERS)

lint: setup
	$(BIN)/ruff check pipeline tests benchmarks

clean-outputs:
	rm -rf work runs
