# fedlearn: `make demo` runs the main job, `make test` runs every check.
# Both install what they need first (venv, pinned packages, Fashion-MNIST).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test check lint typecheck unit integration bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,dp,ray]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist puts the real data in /usr/share/datasets.
data:
	@if [ -f $(FMNIST) ] || [ -f "$${FEDLEARN_DATA:-$$HOME/.cache/fedlearn}/fashion-mnist/train-images-idx3-ubyte.gz" ]; then \
		echo "fashion-mnist: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist; see 'fedlearn datasets'"; \
	else \
		echo "warning: no apt-get; run '$(BIN)/fedlearn datasets fetch fashion-mnist'"; \
	fi

# A real server and six client processes on 127.0.0.1 train one model on
# Fashion-MNIST; then the centralized baseline for comparison.
demo: install data
	$(BIN)/fedlearn run --dataset fashion-mnist --model mlp --clients 6 --rounds 20 \
		--partition iid --local-epochs 1 --batch-size 32 --optimizer adam --lr 0.001 --seed 0
	$(BIN)/fedlearn centralized --dataset fashion-mnist --model mlp --epochs 5

lint: install
	$(BIN)/ruff check src tests benchmarks

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit -q

integration: install data
	$(BIN)/pytest tests/integration -q

check: lint typecheck unit integration

test: install data check

# Benchmarks of BENCHMARKS.md: each prints a table and writes benchmarks/results/<name>.json.
# W2-CNN and W2-CIFAR (about 10 minutes each on a busy 2-core machine) use one torch
# thread, as two threads of one process stall each other when other work shares the
# cores; 1,000/100 runs one round, with the memory of the vectorized engine alone.
bench: install data
	$(BIN)/python benchmarks/w1_six_clients.py
	$(BIN)/python benchmarks/w2_hundred_clients.py
	$(BIN)/python benchmarks/w2_hundred_clients.py --model cnn --scales 100/10:5 --threads 1
	$(BIN)/python benchmarks/w2_hundred_clients.py --model cnn --scales 1000/100:1 --threads 1 \
		--alone vectorized --no-noise
	$(BIN)/python benchmarks/w2_hundred_clients.py --model cifar-cnn --rounds 3 --threads 1
	$(BIN)/python benchmarks/w2_ray.py
	$(BIN)/python benchmarks/w3_server_load.py
	$(BIN)/python benchmarks/w4_stragglers.py
	$(BIN)/python benchmarks/w4_sim.py
	$(BIN)/python benchmarks/w7_privacy.py
	$(BIN)/python benchmarks/w8_secagg.py
	$(BIN)/python benchmarks/w5_robustness.py
	$(BIN)/python benchmarks/w6_heterogeneity.py
	$(BIN)/python benchmarks/w6_heterogeneity.py --model cnn --rounds 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
