#!/usr/bin/env bash
# Post-deploy script of prep.yaml (torch.post-deploy.sh: the same for torch.yaml). Snakemake runs it once, in
# the new environment, from its working directory, which must be the repository root.
# It installs this checkout's vcm package: editable, so code changes need no new environment, and without
# dependencies, which the environment file pins.
set -euo pipefail
if ! grep -qs '^name = "vcm"$' pyproject.toml; then
    echo "vcm: no vcm pyproject.toml in $PWD; run snakemake from the vcm repository root" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation --editable .
