#!/usr/bin/env bash
# One-time set-up of a fresh clone, run by demo.sh and test.sh (safe to run again):
#   1. Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt is available;
#   2. a virtual environment in .venv;
#   3. the pinned CPU build of PyTorch, installed first so that torchslim's own
#      range requirement (torch>=2.3) does not pull a multi-GB CUDA build;
#   4. torchslim itself (editable) with its ONNX, logger (TensorBoard, MLflow), search (Optuna) and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCHSLIM_TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "setup: installing Debian package dataset-fashion-mnist" >&2
        { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
            || echo "setup: could not install dataset-fashion-mnist; torchslim will look elsewhere or download" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing $TORCH_SPEC (CPU build)" >&2
    .venv/bin/pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import torchslim, onnxruntime, pytest, hypothesis, tensorboard, mlflow, optuna" >/dev/null 2>&1 \
        || [ pyproject.toml -nt .venv/.torchslim-installed ]; then
    echo "setup: installing torchslim and its extras" >&2
    .venv/bin/pip install -q -e '.[onnx,tensorboard,mlflow,search,test]'
    touch .venv/.torchslim-installed
fi
