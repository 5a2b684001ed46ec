#!/usr/bin/env bash
# AR -> LoopMDM on CPU with a tiny random Llama: import, adapt (mask annealing, shifted
# prediction), export, and the loss per loop count S. About 5 minutes on 2 cores.
#   OUT=/tmp/from_ar bash examples/from_pretrained/cpu_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/loopmdm_from_ar}
ITERS=${TRAIN_ITERS:-300}
PY=${PYTHON:-python}
rm -rf "$OUT" && mkdir -p "$OUT"

$PY examples/from_pretrained/make_tiny_ar.py "$OUT/ar"
# Layers 2, 3 of 6 become the loop block; --retrofit drops layers 4, 5 so that S = 2 is
# as deep as the pretrained model.
$PY tools/convert_hf_to_checkpoint.py --from-ar "$OUT/ar" --save "$OUT/imported" \
    --loop-layers 2 4 --max-loops 2 --retrofit --shift-logits
read -r -a MODEL <<< "$(cat "$OUT/imported/pretrain_flags.txt")"

$PY -m torch.distributed.run --nproc_per_node 1 --master_port "${MASTER_PORT:-$((20000 + RANDOM % 20000))}" \
    pretrain_loopmdm.py "${MODEL[@]}" --device cpu \
    --load "$OUT/imported" --finetune --save "$OUT/adapted" \
    --mock-data --vocab-size 128 --micro-batch-size 16 --global-batch-size 16 \
    --train-iters "$ITERS" --lr 1e-3 --lr-warmup-iters 20 --lr-decay-style cosine \
    --attention-mask-anneal-iters $((ITERS / 3)) --log-interval 25 \
    --metrics-file "$OUT/metrics.jsonl"

$PY tools/convert_checkpoint_to_hf.py --load "$OUT/adapted" --save "$OUT/hf"
$PY examples/from_pretrained/loss_vs_loops.py "$OUT/hf" --num-loops 1 2 3 4
