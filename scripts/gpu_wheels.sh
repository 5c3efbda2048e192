#!/usr/bin/env bash
# For the offline GPU box (Python 3.12, torch 2.11, Triton 3.6, none of hstu-exp's other
# dependencies): download the wheels of constraints/gpu-box.txt that its image lacks (every
# pinned line not marked "on the box") into ./.whl, here on a machine with the package
# registries; carry .whl along, then start commands there with scripts/gpu_run.sh.
#   scripts/gpu_wheels.sh            # ~38 MiB; .whl is git-ignored
#   scripts/gpu_wheels.sh --slim     # ~14 MiB: wandb's wheel without its binaries (wandb/bin:
#       wandb-core, the service every W&B run needs, and two helpers), so the tree plus .whl fit
#       the device's 64 MiB; wandb then imports (the test launcher preloads it) but cannot run:
#       use logger=none there (SERVE_LOGGER=none for scripts/gpu_serve.sh); remove the slim
#       wheel to download the whole one again
set -euo pipefail
slim=${1:-}
[ -z "$slim" ] || [ "$slim" = --slim ] || { echo "gpu_wheels.sh: unknown option '$slim' (--slim)" >&2; exit 2; }
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
if [ -n "$slim" ]; then
  python3 - .whl/wandb-*.whl <<'PY'
import pathlib, sys, zipfile
wheel = pathlib.Path(sys.argv[1])
full = zipfile.ZipFile(wheel)
if any(n.startswith("wandb/bin/") for n in full.namelist()):
    tmp = wheel.with_suffix(".slim")
    with full, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for item in full.infolist():
            if item.filename.startswith("wandb/bin/"):
                continue
            data = full.read(item)
            if item.filename.endswith(".dist-info/RECORD"):  # RECORD names only what the wheel holds
                lines = data.decode().splitlines()
                data = "".join(f"{l}\n" for l in lines if not l.startswith("wandb/bin/")).encode()
            out.writestr(item, data)
    tmp.replace(wheel)
    print(f"{wheel.name}: wandb/bin left out (imports, cannot start a W&B run)")
PY
fi
du -sh .whl
