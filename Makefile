# Quickstart: `make demo` (set up, train the digits demo) and `make test` (set up, run the tests).
VENV := .venv
STAMP := $(VENV)/.orch-setup-done

.PHONY: setup demo test lint bench
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orch submit jobs/dit_digits.yaml

test: $(STAMP) lint
	bash scripts/install_test_services.sh
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python bench/cli_latency.py
	$(VENV)/bin/python bench/overhead.py
