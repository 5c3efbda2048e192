#!/usr/bin/env bash
# Run a command with the GPU box's Triton (constraints/gpu-box.txt: 3.6) in front of the
# installed one, so CI compiles the kernels for sm_90a with the compiler the box runs as well as
# with the CPU stack's (Triton's experimental Gluon API changed names between the two).
#   scripts/box_triton.sh .venv/bin/python -m pytest -q tests/test_kernel_report.py
#   scripts/box_triton.sh          # no command: only install it (.ci/run does, beside the tests)
# Triton goes into .ci/triton-box/ once (--no-deps: the venv's torch drives it; only compiling
# happens, no kernel runs).
set -euo pipefail
cd "$(dirname "$0")/.."
spec=$(grep '^triton==' constraints/gpu-box.txt | sed 's/ *#.*//')
dir=.ci/triton-box
if ! ls "$dir" 2>/dev/null | grep -q "^triton-${spec#triton==}.dist-info$"; then
  rm -rf "$dir"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "$spec"
fi
export PYTHONPATH="$PWD/$dir:$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -c 'import triton; print("box_triton: triton", triton.__version__, "from", triton.__file__)'
"$@"
