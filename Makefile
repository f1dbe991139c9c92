# Two commands for a fresh machine: `make demo` (install + run the embedded demo end to end) and
# `make test` (install + the test suite). Everything installs into .venv; the CPU build of torch is
# installed first, pinned, so pip never pulls a multi-GB CUDA build (HPC users install their own).
VENV ?= .venv
TORCH ?= torch==2.13.0
CORES ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo compare test install system-deps lint clean-results

demo: install
	snakemake --cores $(CORES)

# The demo with the ControlNet baseline beside VCM (the paper's Table 1 on results/eval/table.md): reuses what
# `make demo` made and trains ControlNet alone, 600 steps (about 4 s a step on two cores: ~45 min more).
COMPARE ?= training={methods: [vcm, controlnet], by_method: {controlnet: {steps: 600}}}
compare: install
	snakemake --cores $(CORES) --config '$(COMPARE)'

test: install
	pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)" -e ".[workflow,test]"
	@touch $@

# dcm2niix converts ADNI DICOM series (vcm manifest); installed from Debian when we are root.
system-deps:
	@command -v dcm2niix >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends dcm2niix) >/dev/null; \
	  else echo "note: dcm2niix not found; install it (Debian: apt-get install dcm2niix) to convert DICOM"; fi; }

lint: install
	ruff check . && ruff format --check .

clean-results:
	rm -rf results .snakemake
