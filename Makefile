# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned, so that nothing pulls a multi-GB CUDA build. GPU users: make TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
EXTRAS ?= sb3,trl,dev
STAMP := $(VENV)/.installed
# the experiments' environments (Box2D for LunarLander, MiniGrid, highway-env): bench, validity, studies
ENVS_STAMP := $(VENV)/.installed-envs
# Ray (the optional extra behind rlattr.scale): make test installs it so that its tests run, not skip
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: demo test lint bench bench-scale validity tda install install-envs install-ray clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

$(ENVS_STAMP): $(STAMP)
	$(PIP) install -q -e ".[$(EXTRAS),envs]"
	touch $(ENVS_STAMP)

install: $(STAMP)

$(RAY_STAMP): $(STAMP)
	$(PIP) install -q -e ".[$(EXTRAS),ray]"
	touch $(RAY_STAMP)

install-envs: $(ENVS_STAMP)

install-ray: $(RAY_STAMP)

demo: $(STAMP)
	$(PY) -m rlattr.cli demo

test: $(RAY_STAMP)
	$(PY) -m pytest tests

# mypy through .ci/typecheck.py, which checks callbacks/ under its installed name rlattr.callbacks
LINT_PATHS := rlattr callbacks experiments tests .ci/typecheck.py
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(PY) .ci/typecheck.py $(LINT_PATHS)

bench: $(ENVS_STAMP)
	$(PY) experiments/bench_grads.py
	$(PY) experiments/bench_sb3_attribution.py
	$(PY) experiments/bench_snapshots.py

# Local LDS of RL scorers against retraining (issue 7); about 20 minutes on one core.
validity: $(ENVS_STAMP)
	nice -n 5 $(PY) experiments/rl_attribution_validity.py --config configs/validity.yaml

# Offline TDA benchmark on digits (LOO, LDS, wall-clock per method); about 25 minutes on 2 cores.
tda: $(STAMP)
	$(PY) experiments/tda_benchmark.py

# Sharded featurisation and LDS ground truth on Ray, 1 and 2 workers against one process (issue 18);
# about 25 minutes on 2 idle cores. Results: docs/results/scale.json, quoted in docs/results/scale.md.
bench-scale: $(RAY_STAMP)
	$(PY) experiments/bench_scale.py

clean:
	rm -rf $(VENV) build *.egg-info
