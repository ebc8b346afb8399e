.PHONY: install test test-all mutations lint format bench

install:
	pip install torch==2.13.0
	pip install -e ".[test]"

test:
	python -m pytest

test-all:  ## includes slow tests (GPU tests need -m gpu on a CUDA machine; eval tests the eval venv)
	python -m pytest -m "not gpu and not eval"

mutations:  ## one-line mutations of the package; each must make its tests fail
	python tests/mutations.py

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

bench:
	python analysis/bench_analyze.py
	python analysis/bench_sample.py
	python analysis/bench_startup.py
