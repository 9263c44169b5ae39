#!/usr/bin/env bash
# Issue 17's measurement on the lent GPU machine. The packages that machine lacks travel as parts built
# here by `python benchmarks/device_bundle.py pack` (.device/1, .device/2, ...), one part per call since a
# call carries at most 64 MiB; each call adds its part to a folder that stays while the machine is warm
# (calls less than 30 s apart). The call that completes the set checks that the engine imports, then
# runs benchmarks/gpu_throughput.py. What it learns lands in $OUT: env.txt, nvidia-smi.txt, log.txt,
# results.json (written after each part of the benchmark) and summary.md.
#
#   device run: command "bash benchmarks/device_run.sh .device/1", carry [".device/1"], timeout_s 120
#   device run: command "bash benchmarks/device_run.sh .device/2", carry [".device/2"], timeout_s 600
#
# BUDGET_S (default 450) is the benchmark's own time budget: it skips parts once it is spent, so the
# call ends inside its 600 s with results.json complete up to the last part that ran.
set -uo pipefail
OUT="${OUT:-/tmp/sam3-device-out}"
SITE="${SITE:-/tmp/sam3-site}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
parts=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do parts+=("$1"); shift; done
[ "$#" -gt 0 ] && shift  # what follows -- goes to gpu_throughput.py (--quick --device cpu: the proof on a CPU)
[ "${#parts[@]}" -gt 0 ] || { echo "usage: bash benchmarks/device_run.sh PART_FOLDER... [-- BENCHMARK_ARGS]"; exit 2; }
python3 benchmarks/device_bundle.py unpack "${parts[@]}" --site "$SITE"
case $? in
  0) ;;
  3) exit 0 ;;  # more parts to come, in the next calls
  *) exit 2 ;;
esac
# The carried packages come first; Ray's workers inherit the variable.
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 - >"$OUT/env.txt" 2>&1 <<'PY' || { cat "$OUT/env.txt"; echo "device_run: the engine does not import here (env.txt)"; exit 3; }
import sys, torch, transformers, ray, deltalake, duckdb, pycocotools, pydantic
from transformers.models.sam3 import Sam3Model
from sam3_engine.engine.stage import stage_names
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
print("transformers", transformers.__version__, "ray", ray.__version__, "deltalake", deltalake.__version__, "duckdb", duckdb.__version__)
print("stages", " ".join(stage_names()))
PY
cat "$OUT/env.txt"
python3 benchmarks/gpu_throughput.py --out "$OUT" --budget-s "${BUDGET_S:-450}" "$@" 2>&1 | tee "$OUT/log.txt"
