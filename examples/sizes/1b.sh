#!/usr/bin/env bash
# 1b with the paper-like recipe; see common.sh for the variables (DATA_PATH, TOKENIZER, ...).
#   DATA_PATH=data/corpus_text_document TOKENIZER=tok bash examples/sizes/1b.sh
set -euo pipefail
MODEL_SIZE=1b
TP=${TP:-2} MICRO_BATCH=${MICRO_BATCH:-4}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec bash "$ROOT/examples/launch.sh" "${RECIPE[@]}" "$@"
