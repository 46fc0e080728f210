#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (the device tool): the paper's
# configuration and the default detector at large batches, a production band through
# band_scores (model busy share, and its maps against the CPU's), compiled, and training.
# Writes JSON and logs under ${GPU_OUT:-out}/ and prints the tables; steps run by priority, each
# under its own time limit, so one that fails or runs long leaves the others' figures.
#   PY=python3 bash bench/gpu_suite.sh       # on the device machine: its python3 holds torch
#   STEPS='^band' PY=python3 bash bench/gpu_suite.sh   # only the steps whose name matches
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_OUT:-out}
py=${PY:-.venv/bin/python}
mkdir -p "$out"
export PYTHONPATH=.:bench PYTHONUNBUFFERED=1
step() {  # step NAME LIMIT_S ARGS…: one benchmark, its output kept in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ -n "${STEPS:-}" && ! "$name" =~ $STEPS ]] && return  # STEPS=regex: only those steps
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$py" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
  echo "   exit $? after ${SECONDS} s in all"
  grep -v -E "Warning|warn|^\s*$" "$out/$name.log" | tail -n 14
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
step band_resnet34_b256 150 bench/band_throughput.py --device cuda --teacher resnet34 \
  --batch 256 --precision bf16
step model_resnet34_b256 120 bench/model_throughput.py --device cuda --teacher resnet34 \
  --batch 256 --repeats 5 --no-official
step band_default_b256 120 bench/band_throughput.py --device cuda --teacher efficientnet_lite1 \
  --scorer memory --batch 256 --precision bf16
step model_default_b256 120 bench/model_throughput.py --device cuda --teacher efficientnet_lite1 \
  --batch 256 --repeats 5 --no-official --memory-bank
step train_resnet34_b32 90 bench/train_throughput.py --device cuda --teacher resnet34 \
  --batch 32 --steps 10 --epoch-tiles 448
step model_resnet34_b64 90 bench/model_throughput.py --device cuda --teacher resnet34 \
  --batch 64 --repeats 5 --no-official
step band_resnet34_b128 120 bench/band_throughput.py --device cuda --teacher resnet34 \
  --batch 128 --precision bf16
step band_resnet34_b256_compiled 180 bench/band_throughput.py --device cuda --teacher resnet34 \
  --batch 256 --precision bf16 --compile
