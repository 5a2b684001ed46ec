#!/usr/bin/env bash
# AR -> LoopMDM on GPUs from a real checkpoint you already have, e.g. Qwen2.5-0.5B (24 layers)
# or Llama-3.2-1B (16 layers; its llama3 RoPE scaling trains, but does not export to HF yet).
#   AR=/models/Qwen2.5-0.5B DATA_PATH=data/corpus_text_document OUT=runs/qwen_loop \
#       bash examples/from_pretrained/gpu_qwen.sh
# Recipe (Dream / DiffuLLaMA): keep the next-token shift, anneal the mask from causal to
# bidirectional over the first ~10% of steps, lr 1e-5..2e-5 with warmup, cosine decay.
# Tokenize the data with the imported tokenizer ($OUT/imported/tokenizer) first:
#   python tools/preprocess_data.py --tokenizer-model $OUT/imported/tokenizer ...
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${AR:?set AR to a Hugging Face Llama/Qwen2/Qwen3/Mistral directory}"
: "${DATA_PATH:?set DATA_PATH to a tokenized corpus prefix}"
OUT=${OUT:-runs/from_ar}
GPUS=${GPUS:-8}
TP=${TP:-1}
ITERS=${TRAIN_ITERS:-20000}

# Loop layers 6..9 (early-middle) up to 3 times; --retrofit drops the 8 layers after them.
python tools/convert_hf_to_checkpoint.py --from-ar "$AR" --save "$OUT/imported" \
    --loop-layers 6 10 --max-loops 3 --retrofit --shift-logits --seq-length 2048
read -r -a MODEL <<< "$(cat "$OUT/imported/pretrain_flags.txt")"

torchrun --nproc_per_node "$GPUS" pretrain_loopmdm.py "${MODEL[@]}" \
    --load "$OUT/imported" --finetune --save "$OUT/adapted" --save-interval 1000 \
    --data-path "$DATA_PATH" --split 995,5,0 \
    --tensor-model-parallel-size "$TP" --use-distributed-optimizer --bf16 \
    --micro-batch-size 4 --global-batch-size 256 --train-iters "$ITERS" \
    --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 500 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 \
    --attention-mask-anneal-iters $((ITERS / 10)) \
    --eval-interval 1000 --eval-iters 10 --log-interval 10

python tools/convert_checkpoint_to_hf.py --load "$OUT/adapted" --save "$OUT/hf" --dtype bf16
