#!/usr/bin/env bash
# Launches pretrain_loopmdm.py with torchrun on this node, as one node of a multi-node job.
#
#   GPUS_PER_NODE  processes on this node (default: visible GPUs, else 2 on CPU)
#   NNODES         nodes in the job (default 1)
#   NODE_RANK      this node's rank, 0..NNODES-1 (default 0)
#   MASTER_ADDR    address of node 0 (default localhost)
#   MASTER_PORT    a free port on node 0 (default 6000)
#
# Every argument is passed to pretrain_loopmdm.py. Example (2 nodes x 8 GPUs), on each node:
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash examples/launch.sh --model-size smdm-170m ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$GPUS_PER_NODE" \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-localhost}" \
    --master_port "${MASTER_PORT:-6000}" \
    "$ROOT/pretrain_loopmdm.py" "$@"
