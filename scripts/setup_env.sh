#!/usr/bin/env bash
# Make ./.venv hold everything hstu-exp needs; called by `make run` and `make test`.
#   scripts/setup_env.sh          # no-op when the install is already current
# One stack per target, each pinned by a constraints file:
#   no NVIDIA GPU (CI, laptops): constraints/cpu.txt, the CPU builds of torch 2.13 and fbgemm 1.8
#     (Triton 3.9 runs the kernels in its interpreter);
#   an NVIDIA GPU answers: constraints/gpu-box.txt, the GPU box's torch 2.11 / Triton 3.6 /
#     torchrec 1.6 (every published number ran on them), with fbgemm's CUDA build.
# fbgemm comes first in the build the target needs; torchrec then goes in with --no-deps (it
# names the CUDA-only `fbgemm-gpu`), followed by its own other requirements, read from its
# metadata (they are torchrec's, not ours, so pyproject does not list them).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.installed
current() { for f in pyproject.toml "$0" constraints/*.txt; do [ "$stamp" -nt "$f" ] || return 1; done; }
if [ -f "$stamp" ] && current; then exit 0; fi

${PYTHON:-python3} -m venv "$venv"
py=$venv/bin/python
# uv installs into the venv what pip would (same constraints, same indexes: PyPI and the local
# wheel store), unpacking torch's wheel several times faster than pip; setup is on CI's serial
# path. uv itself comes from pip, pinned here (it is a tool of this script, not a dependency).
# --compile-bytecode: pip compiles every module at install and uv does not by default; where
# PYTHONDONTWRITEBYTECODE is set (CI's image), each process would then compile all it imports
# (torchrec twice as slow to import, the test suite minutes slower).
"$py" -m pip install -q --disable-pip-version-check uv==0.13.10
pip=("$venv/bin/uv" pip install -q --compile-bytecode --python "$py")
# Machines with a local wheel store (CI's, ours) take torch from there instead of downloading it.
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the GPU box's stack with CUDA fbgemm" >&2
  pip+=(-c constraints/gpu-box.txt)
  "${pip[@]}" torch triton fbgemm-gpu==1.6.0
else
  echo "setup: no NVIDIA GPU, installing the CPU stack" >&2
  pip+=(-c constraints/cpu.txt)
  "${pip[@]}" torch triton fbgemm-gpu-cpu
fi
"${pip[@]}" --no-deps torchrec
mapfile -t torchrec_needs < <("$py" - <<'PY'
import importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has packaging only inside pip
    from pip._vendor.packaging.requirements import Requirement
for line in md.requires("torchrec") or []:
    req = Requirement(line)
    if req.name != "fbgemm-gpu" and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(req)
PY
)
"${pip[@]}" "${torchrec_needs[@]}"
# Not the e2e extra: pip would resolve torchrec's fbgemm-gpu again.
"${pip[@]}" -e '.[test,lint,dashboard]'
touch "$stamp"
