#!/usr/bin/env bash
# A laptop run on CPU: the debug size on mock data, data parallel over 2 processes (gloo).
#   bash examples/pretrain_cpu_debug.sh [more flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${OUT:-runs/cpu-debug}
GPUS_PER_NODE=${GPUS_PER_NODE:-2} exec bash "$ROOT/examples/launch.sh" \
    --device cpu --model-size debug --mock-data --vocab-size 64 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "${TRAIN_ITERS:-200}" \
    --lr 1e-2 --lr-warmup-iters "${WARMUP:-10}" --lr-decay-style cosine --time-sampling antithetic \
    --log-interval 10 --eval-interval 100 --eval-iters 2 \
    --save "$OUT/checkpoints" --save-interval 100 --tensorboard-dir "$OUT/tensorboard" "$@"
