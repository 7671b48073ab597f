# Two commands on a fresh machine: `make demo` and `make test`. Both set up
# .venv, install the package and fetch the offline default data when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SEED_DATA ?= $(CURDIR)/.data
# Where seed-eval caches features and `make teacher` keeps the reference teacher (outside the repository, kept across clones).
export SEED_CACHE ?= $(HOME)/.cache/seed
TEACHER_DIR := $(SEED_CACHE)/reference-teacher
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo teacher teachers-labelled test lint bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST (original IDX files) from Debian's dataset-fashion-mnist: installed
# system-wide when we are root, else unpacked into $(SEED_DATA) without root.
data:
	@if [ -f "$(SEED_DATA)/fashion-mnist/train-images-idx3-ubyte.gz" ] || [ -f "$(FMNIST_SYSTEM)/train-images-idx3-ubyte.gz" ]; then \
		echo "fashion-mnist: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist; }; \
	elif command -v apt-get >/dev/null; then \
		tmp=$$(mktemp -d) && (cd $$tmp && apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb root) && \
		mkdir -p "$(SEED_DATA)" && cp -r $$tmp/root$(FMNIST_SYSTEM) "$(SEED_DATA)/" && rm -rf $$tmp; \
	else \
		echo "fashion-mnist missing: put the IDX files in $(SEED_DATA)/fashion-mnist or run with --download when online"; exit 1; \
	fi

# A SimCLR teacher, a SEED student, then both next to random init of their architecture (3 seeds) under one protocol,
# at Fashion-MNIST's native 28px. bf16 where the CPU computes it in hardware (AVX512-BF16 or AMX), else fp32.
DEMO_PRECISION = $(BIN)/python -c "from seed.precision import native_cpu_bf16; print('bf16-mixed' if native_cpu_bf16() else '32-true')"

demo: setup data
	precision=$$($(DEMO_PRECISION)) && \
	$(BIN)/seed-pretrain --config configs/demo/pretrain.yaml --precision $$precision && \
	$(BIN)/seed-distill --config configs/demo/distill.yaml --precision $$precision && \
	$(BIN)/seed-eval compare --image-size 28 --checkpoints teacher=runs/demo/pretrain/teacher.pt,student=runs/demo/distill/student.pt --output runs/demo/compare

# The reference teacher (configs/teacher/reference.yaml, about 90 min on 2 cores) in $(TEACHER_DIR), where
# `make bench` finds it; never in git. Interrupted, the same command continues from its last.ckpt.
teacher: setup data
	$(BIN)/seed-pretrain --config configs/teacher/reference.yaml --output $(TEACHER_DIR)

# The labelled benchmark's two supervised ResNet-18 teachers (configs/teacher/labelled_{a,b}.yaml, side by side, about
# 50 min on 2 cores, float32) in $(SEED_CACHE)/labelled-teachers, never in git. Interrupted, the
# same command continues from their last.ckpt; `python -m bench.labelled` builds them too when they are missing.
teachers-labelled: setup data
	$(BIN)/python -m bench.labelled --teachers-only

# One pytest worker per core (each test runs its torch on one thread), at most 8.
test: setup data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8

lint: setup
	$(BIN)/ruff check .

# Every CPU benchmark (about 6 hours on 2 cores: 2.5 of them the quality benchmark, about 3 the labelled one with its teachers), then docs/BENCHMARKS.md and docs/bench/*.png from bench/results/*.json.
bench: setup data
	$(BIN)/python -m bench

# The speed benchmarks on a CUDA GPU at 224px (bench/results/*_gpu.json); one line and exit 2 where there is none.
bench-gpu: setup data
	$(BIN)/python -m bench --gpu

clean:
	rm -rf runs .pytest_cache
