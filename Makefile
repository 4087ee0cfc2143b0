# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: setup demo test test-fast bench clean distclean

$(STAMP): requirements.lock requirements-nodeps.txt setup.cfg
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

## demo: build data, pretrain a small MAE, embed, fit the joint model, analyse, write demo_out/report.md
## (run it again: finished stages are kept, an interrupted one resumes; see experiments/demo.py)
demo: $(STAMP)
	XLA_FLAGS= $(BIN)/python experiments/demo.py --out demo_out

## test: the whole CPU suite (8 forced host devices for the sharding tests), one test file at a time
## in each of TEST_WORKERS processes (pytest-xdist; TEST_WORKERS=0 runs it in this process)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

## clean: the demo's and benchmarks' outputs (the venv stays; `make distclean` removes it too)
clean:
	rm -rf demo_out bench_out

distclean: clean
	rm -rf $(VENV) *.egg-info
