#!/usr/bin/env bash
# Create .venv with torch, this pack (editable) and the test tools. Safe to rerun.
#
# torch and torchvision are installed as a matching pair before anything else: spandrel imports
# torchvision, and a torchvision that does not match torch fails to import. Override the pair with
# TORCH_SPEC, e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    .venv/bin/pip install --quiet --disable-pip-version-check $torch_spec
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,onnx,ncnn]"

# chaiNNer's own ONNX runtime, pinned as chaiNNer pins it: the tests open every kind of export
# with it, because a file only counts as chaiNNer-compatible if chaiNNer's versions accept it.
if [ ! -x .venv-chainner/bin/python ]; then
    "$python" -m venv .venv-chainner
fi
if ! .venv-chainner/bin/python -c "import onnx, onnxruntime" >/dev/null 2>&1; then
    .venv-chainner/bin/pip install --quiet --disable-pip-version-check \
        "onnx==1.16.0" "onnxruntime==1.17.1" "numpy<2"
fi
