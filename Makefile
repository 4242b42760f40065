# Fresh machine: `make demo` or `make test` creates .venv and installs everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast lint format bench bench-gpu clean-demo

# pip byte-compiles what it installs one file at a time (1 min 47 s of a 3 min 18 s install, measured), most of
# it never imported. So pip does not, and Python writes each module's .pyc the first time a process imports it
# (measured: torch, Ray, Ray Data/Train and diffusers cost 16 s of CPU once, not in every later process).
# PYTHONDONTWRITEBYTECODE, which some machines set (our 2-core ones do), is dropped for every target: with it
# and no .pyc, each process (every Ray worker) would compile those imports again (27 s instead of 11 s).
unexport PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: local Ray, a local folder, the tiny random-weight model (images are noise).
demo: $(STAMP)
	$(PY) jobs/distill.py --dataset cifar10 --ipc 10 --model tiny --gen-resolution 128 \
		--epochs 30 --eval-runs 1 --out $(DEMO_OUT)
	$(PY) -m gdd_ray status $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Every test, the slow end-to-end ones (Ray clusters, ray job submit) included, on TEST_WORKERS pytest-xdist
# workers: a file runs whole in one worker (its module fixtures once), the costliest files first (conftest.py).
# The suite waits on Ray and subprocesses a third of the time: two workers fill both cores. TEST_WORKERS=0
# runs everything in this one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: lint
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) -m "not slow"

bench: $(STAMP)
	$(PY) jobs/bench_generate.py --out bench_results/generate.json

# One GPU node where pip works, no download (SDXL-Turbo's architecture with random weights): the engine matrix
# (the loop before the engine work; the fast path eager, compiled, UNet/decoder/both channels_last, with the
# tiny decoder; batch 8/16/32) and the end-to-end --stages generate rate with production defaults. On a bare
# GPU image (no pip, no diffusers, no Ray) use `bash jobs/gpu_bench.sh --part eager|compiled|train` instead:
# docs/gpu.md.
GPU_BENCH_OUT ?= bench_results/generate_gpu.json
bench-gpu: $(STAMP)
	$(PY) jobs/bench_generate.py --model sdxl-random --gen-resolution 512 --image-size 32 --ipc 64 \
		--classes 20 --batch-size 16 --unit-size 64 --threads 0 --skip-paper-loop --noop-shards 0 \
		--engines fast,pipeline-call --batch-sizes 8,16,32 --vae-dtypes bf16 --batches 10 \
		--compile-fast --compile-batch-sizes 16 --tiny-decoder --channels-last --out $(GPU_BENCH_OUT)

clean-demo:
	rm -rf $(DEMO_OUT)
