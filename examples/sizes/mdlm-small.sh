#!/usr/bin/env bash
# mdlm-small with the paper-like recipe; see common.sh for the variables (DATA_PATH, TOKENIZER, ...).
#   DATA_PATH=data/corpus_text_document TOKENIZER=tok bash examples/sizes/mdlm-small.sh
set -euo pipefail
MODEL_SIZE=mdlm-small
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec bash "$ROOT/examples/launch.sh" "${RECIPE[@]}" "$@"
