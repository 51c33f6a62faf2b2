# The two front-door commands (see README):
#   make demo   set everything up, fetch the default model, generate text with it
#   make test   set everything up, fetch the default model, run the test suite
# and, for CI and contributors:
#   make lint   ruff, mypy and the import contracts (pyproject.toml holds their rules)
PROMPT ?= The capital of France is
VENV := .venv/bin

.PHONY: setup setup-test pull demo test lint bench clean

setup:
	scripts/bootstrap.sh

setup-test:
	scripts/bootstrap.sh test

pull:
	$(VENV)/rocmforge pull smollm2

demo: setup pull
	$(VENV)/rocmforge generate --gguf smollm2 --prompt "$(PROMPT)" --max-tokens 48 --temperature 0

test: setup-test pull
	$(VENV)/python -m pytest -q

lint: setup-test
	$(VENV)/ruff check .
	$(VENV)/mypy
	$(VENV)/lint-imports

bench: setup pull
	$(VENV)/python benchmarks/cpu_decode.py

clean:
	rm -rf .venv .pytest_cache .hypothesis .mypy_cache .ruff_cache
