#!/usr/bin/env bash
# smdm-170m with the paper-like recipe; see common.sh for the variables (DATA_PATH, TOKENIZER, ...).
#   DATA_PATH=data/corpus_text_document TOKENIZER=tok bash examples/sizes/smdm-170m.sh
set -euo pipefail
MODEL_SIZE=smdm-170m
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec bash "$ROOT/examples/launch.sh" "${RECIPE[@]}" "$@"
