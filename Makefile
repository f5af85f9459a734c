# The few commands a contributor needs.
.PHONY: install test test-fast lint format pretrain bench cluster-start cluster-stop

install:      ## editable install with test/lint tools
	python -m pip install -e ".[dev]"

test:         ## the whole suite (what CI runs)
	python -m pytest -q

test-fast:    ## skip multi-process and Slurm tests
	python -m pytest -q -m "not slow and not slurm"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

pretrain:     ## the embedded default: tiny EVE on the synthetic corpus, CPU
	eve-pretrain

bench:        ## Table 1 on this machine's device
	eve-bench --model eve_tiny --json benchmarks/results/table1-local.json

cluster-start:
	slurm/local_cluster.sh start

cluster-stop:
	slurm/local_cluster.sh stop
