#!/usr/bin/env bash
# Make ./.venv hold everything hstu-exp needs; called by `make run` and `make test`.
#   scripts/setup_env.sh          # no-op when the install is already current
# Picks the CUDA builds of torch and fbgemm-gpu where an NVIDIA GPU answers, the CPU builds
# elsewhere. torchrec goes in with --no-deps because it names the CUDA-only `fbgemm-gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then exit 0; fi

${PYTHON:-python3} -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# Machines with a local wheel store (CI's, ours) take torch from there instead of downloading it.
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA stack" >&2
  "${pip[@]}" torch==2.13.0 fbgemm-gpu==1.8.0          # this torch brings its own triton
else
  echo "setup: no NVIDIA GPU, installing the CPU stack" >&2
  "${pip[@]}" torch==2.13.0 fbgemm-gpu-cpu==1.8.0 triton==3.9.0
fi
"${pip[@]}" --no-deps torchrec==1.8.0
"${pip[@]}" -e '.[test,dashboard]'
touch "$stamp"
