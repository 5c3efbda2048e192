#!/usr/bin/env bash
# For the offline GPU box (Python 3.12, torch 2.11, Triton 3.6, none of hstu-exp's other
# dependencies): download the wheels of constraints/gpu-box.txt that its image lacks (every
# pinned line not marked "on the box") into ./.whl, here on a machine with the package
# registries; carry .whl along, then start commands there with scripts/gpu_run.sh.
#   scripts/gpu_wheels.sh            # ~38 MiB; .whl is git-ignored
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
have() {  # a wheel (or the sdist-built wheel) of this name and version is in .whl
  ls .whl | grep -qi "^$(echo "$1" | tr - _)-$2-" || ls .whl | grep -qi "^$1-$2-"
}
grep -v '# on the box' constraints/gpu-box.txt | sed 's/#.*//' | grep '==' |
while read -r spec; do
  name=${spec%%==*} ver=${spec##*==}
  have "$name" "$ver" && continue
  if [ "$name" = antlr4-python3-runtime ]; then  # exists only as a source package
    python3 -m pip wheel -q --no-deps --no-binary=:all: "$spec" -w .whl
    continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
du -sh .whl
