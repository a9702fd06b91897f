# The two commands of the README. Each sets up .venv on first use (scripts/setup.sh), then runs.
PY := .venv/bin/python

.PHONY: quickstart test setup
setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/training-hub quickstart

test: setup
	$(PY) -m pytest -q -ra
