#!/usr/bin/env bash
# Creates .venv and installs the pinned stack. Safe to run again: each step is a no-op when done.
#
# - torch: an existing torch (e.g. on a GPU image) is reused through --system-site-packages and
#   pinned by a constraints file, so no second torch is ever installed; with none, torch==2.13.0.
# - megatron-core 0.19.2: installed with --no-deps --ignore-requires-python, because its wheel
#   declares Python >=3.12 yet works on 3.11, and its own needs are only torch, numpy, packaging.
# - DeepSpeed 0.19.8 (pure Python, nothing compiled), then this package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[install] no torch found: installing torch==2.13.0"
    "${PIP[@]}" "torch==2.13.0"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
echo "[install] using torch $TORCH_VERSION"

"${PIP[@]}" -c "$VENV/constraints.txt" numpy "packaging>=24.2"
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("megatron-core"))' 2>/dev/null)" != "0.19.2" ]; then
    echo "[install] megatron-core==0.19.2"
    "${PIP[@]}" --no-deps --ignore-requires-python "megatron-core==0.19.2"
fi
echo "[install] deepspeed==0.19.8 and megatron-loopmdm[test] (editable)"
DS_BUILD_OPS=0 "${PIP[@]}" -c "$VENV/constraints.txt" "deepspeed==0.19.8" -e ".[test]"
"$PY" -c "import megatron_loopmdm, deepspeed, megatron.core; print('[install] ok: megatron-loopmdm', megatron_loopmdm.__version__)"
