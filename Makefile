.PHONY: setup test test-all lint format toy-compare

setup:
	python -m pip install -r requirements-dev.txt

test:
	python -m pytest -m "not slow or ci" -q

test-all:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

toy-compare:  # train CD no-reg / gen-reg / folder-reg, CrossInit, CD+CR on one toy concept; compare
	python bench/toy_compare.py
