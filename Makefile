# Two commands do everything: `make run` (the workflow on the embedded synthetic cohort) and
# `make test` (the test suite). Both create .venv from the pinned lock file when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES)

.PHONY: run test test-fast test-tools lint fmt schema bench gpu-check report slurm-up slurm-down clean

run: $(VENV)/.installed
	$(SNAKEMAKE)
	$(SNAKEMAKE) --report results/report/report.html
	@cat results/report/results.md

test: $(VENV)/.installed
	$(BIN)/pytest

test-fast: $(VENV)/.installed
	$(BIN)/pytest -m "not slow and not slurm"

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests tools bench workflow/scripts
	$(BIN)/ruff format --check src tests tools bench workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

fmt: $(VENV)/.installed
	$(BIN)/ruff check --fix src tests tools bench workflow/scripts
	$(BIN)/ruff format src tests tools bench workflow/scripts
	$(BIN)/snakefmt Snakefile workflow/rules

# config/schema.yaml is generated from src/stepseg/settings.py (tests/test_settings.py fails until
# it is regenerated after a setting changed)
schema: $(VENV)/.installed
	$(BIN)/python tools/schema.py > config/schema.yaml.tmp
	mv config/schema.yaml.tmp config/schema.yaml

# Every bench in turn. One that cannot run here says why and exits 77 (skipped): ceiling.py
# without a finished run (results/manifest.tsv), convert.py without dcm2niix, download.py
# without curl. Any other failure stops the loop.
bench: $(VENV)/.installed
	@for b in bench/*.py; do \
		echo "== $$b"; $(BIN)/python $$b; status=$$?; \
		if [ $$status -eq 77 ]; then echo "== $$b: skipped"; \
		elif [ $$status -ne 0 ]; then echo "== $$b: failed ($$status)"; exit $$status; fi; \
	done

# On a machine with a CUDA GPU: CUDA tests, paper-geometry training step, loader (about 8 min).
gpu-check: $(VENV)/.installed
	bash tools/gpu-check.sh

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# dcm2niix and dicom3tools' dciodvfy for the cross-checks in the tests (root, Debian; installs
# only what is missing). Without them those checks skip, unless STEPSEG_REQUIRE names them.
test-tools:
	bash tools/test-tools.sh

# A single-node SLURM on 127.0.0.1 for tests/test_slurm.py (root, Debian: installs slurm-wlm, munge).
slurm-up:
	bash tools/slurm/up.sh

slurm-down:
	bash tools/slurm/down.sh

clean:
	rm -rf results .snakemake
