#!/usr/bin/env bash
# The GPU benchmarks (issue #6) in one go: BrainLDM-sized networks with random weights on the 160x224x160 grid.
#   bash bench/gpu.sh [OUT_DIR]                on a CUDA machine (results/benchmarks/gpu by default)
#   SMOKE=1 bash bench/gpu.sh /tmp/gpu-smoke   on a CPU: the same commands on a 32x48x32 grid, 1-2 steps
# Missing packages install from the wheels in .whl/ (made by bench/wheels.sh for the GPU machine's Python 3.12).
# Writes: env.json, sample_b1.json, sample_b16.json, profile_sample_b16.txt, train.json, train_checkpointing.json,
# log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/benchmarks/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c "import monai, nibabel, jsonschema, diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vcm_site .whl/*.whl
  export PYTHONPATH=/tmp/vcm_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "${SMOKE:-}" ]; then
  scale=(--scale brainldm --grid 32,48,32 --device cpu)
  sample_steps=2 train_steps=1 big=2
else
  scale=(--scale brainldm --device cuda)
  sample_steps=10 train_steps=5 big=16
fi
exec > >(tee "$OUT/log.txt") 2>&1
date -u +"start %Y-%m-%dT%H:%M:%SZ"
"$PY" - "$OUT/env.json" <<'PYEOF'
import json, platform, sys, torch, monai
info = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
        "cpu_count": __import__("os").cpu_count()}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
PYEOF
# sampling: batch 1 (the memory goal) and the production batch (throughput), DDIM-200 extrapolated
"$PY" -m vcm.bench sample "${scale[@]}" --volumes 1 --steps "$sample_steps" --out "$OUT/sample_b1.json"
"$PY" -m vcm.bench sample "${scale[@]}" --volumes "$big" --steps "$sample_steps" --out "$OUT/sample_b$big.json" \
  --profile "$OUT/profile_sample_b$big.txt"  # where a production step's time goes: backbone, vcm, scheduler
# training: batch 2 and 16 (bf16 on CUDA), without and with activation checkpointing of the encoders
"$PY" -m vcm.bench train "${scale[@]}" --batch-sizes "2,$big" --steps "$train_steps" --out "$OUT/train.json"
"$PY" -m vcm.bench train "${scale[@]}" --batch-sizes "2,$big" --steps "$train_steps" --checkpointing \
  --out "$OUT/train_checkpointing.json"
# Not here: `python -m vcm.bench cohort` (QC-passed subjects per hour of generate-shard, DDIM-200 vs the config's
# sampler). It runs the stage's engine on a finished run (dataset.h5 with label maps, a trained vcm.pt of the
# bundle, the QC segmenter); random BrainLDM weights would need all three built at 160x224x160 first, far more
# than this script should hold. On a GPU machine with a finished BrainLDM-grid run:
#   python -m vcm.bench cohort --results RESULTS --device cuda --subjects 16 --out "$OUT/cohort.csv"
date -u +"end %Y-%m-%dT%H:%M:%SZ"
