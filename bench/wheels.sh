#!/usr/bin/env bash
# Download the wheels that bench/gpu.sh installs on a GPU machine that cannot reach PyPI (Python 3.12,
# x86-64 Linux), into .whl/ at the repository root (git-ignored). The machine is assumed to have PyTorch,
# numpy, scipy, h5py, pandas, PyYAML, tqdm and matplotlib already; these are what vcm imports besides (diffusers
# for the dpmpp_2m sampler, nilearn for the MNI template of the demo world; antspyx is left out: its wheel is
# larger than a device call carries, so registration and the atlas backend stay on the CPU machine).
#   bash bench/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${platforms[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download -q "${args[@]}" \
  monai==1.6.1 nibabel==5.4.2 diffusers==0.42.1 importlib_metadata==10.2.0 nilearn==0.14.1 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
ls -1 .whl
