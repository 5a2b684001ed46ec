#!/usr/bin/env bash
# The paper-like recipe shared by the size scripts: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0,
# cosine decay with warmup, bf16. Override any variable from the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA_PATH=${DATA_PATH:?set DATA_PATH to an indexed dataset prefix (tools/preprocess_data.py)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a Hugging Face tokenizer directory}
SAVE=${SAVE:-checkpoints/$MODEL_SIZE}
RECIPE=(
    --model-size "$MODEL_SIZE"
    --data-path $DATA_PATH --split "${SPLIT:-969,30,1}"
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
    --micro-batch-size "${MICRO_BATCH:-16}" --global-batch-size "${GLOBAL_BATCH:-512}"
    --train-iters "${TRAIN_ITERS:-100000}"
    --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}" --lr-decay-style cosine
    --lr-warmup-iters "${WARMUP:-2000}"
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16
    --max-loops "${MAX_LOOPS:-4}" --loop-sampling uniform
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
    --use-distributed-optimizer
    --save "$SAVE" --load "$SAVE" --save-interval "${SAVE_INTERVAL:-2000}"
    --log-interval 10 --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters 20
    --tensorboard-dir "$SAVE/tensorboard"
)
