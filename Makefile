# `make demo` and `make test` each build .venv/ from nothing when it is missing or stale.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q tests

# make demo [QUICK=1] [DATA=SPEC] [DETECT=SPEC] [SLIDES="paths"] [OUT=folder]: scripts/demo.py
demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py $(if $(QUICK),--quick) $(if $(DATA),--data "$(DATA)") \
		$(if $(DETECT),--detect "$(DETECT)") $(if $(SLIDES),--slides $(SLIDES)) $(if $(OUT),--out "$(OUT)")

clean:
	rm -rf $(VENV) demo_out
