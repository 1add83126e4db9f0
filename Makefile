.PHONY: setup test test-all lint format

setup:
	python -m pip install -r requirements-dev.txt

test:
	python -m pytest -m "not slow" -q

test-all:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .
