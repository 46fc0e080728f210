#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (device tool): model throughput
# in fp32/bf16 × NCHW/channels-last at several batch sizes, for the paper's teacher and the
# default one. Writes JSON under ${OUT:-out}/ and prints the tables. Needs the venv (carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for teacher in resnet34 efficientnet_lite0; do
  for batch in 8 64 256; do
    .venv/bin/python bench/model_throughput.py --device cuda --teacher "$teacher" \
      --batch "$batch" --repeats 20 --no-official --json "$out/throughput_${teacher}_b${batch}.json"
  done
done
# the default detector (student + memory bank) against the student alone, and training speed
for batch in 64 256; do
  .venv/bin/python bench/model_throughput.py --device cuda --teacher efficientnet_lite0 \
    --batch "$batch" --repeats 20 --no-official --memory-bank \
    --json "$out/throughput_default_b${batch}.json"
done
for batch in 8 32; do
  .venv/bin/python bench/train_throughput.py --device cuda --batch "$batch" --steps 30 \
    --json "$out/train_b${batch}.json"
done
