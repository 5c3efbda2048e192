#!/usr/bin/env bash
# For a GPU machine without network that has Python 3.12, torch 2.11 and Triton but none of
# hstu-exp's other dependencies: download their wheels here (a machine with the package
# registries) into ./.whl, carry .whl along, then start commands there with scripts/gpu_run.sh.
#   scripts/gpu_wheels.sh            # ~38 MiB; .whl is git-ignored
# fbgemm 1.6 / torchrec 1.6 are the releases built for torch 2.11. The CPU build of fbgemm
# travels (the CUDA one is 465 MB): EmbeddingCollection works on CUDA tensors with it, but
# torch.ops.fbgemm.*, KeyedJaggedTensor.permute and to_padded_dense on CUDA tensors do not, so
# GPU code paths stay on plain torch and Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
wheels=(torchrec==1.6.1 fbgemm-gpu-cpu==1.6.0 tensordict==0.15.3 pyvers==0.2.3 iopath==0.1.9
        torchmetrics==1.0.3 hydra-core==1.3.8 omegaconf==2.3.1 wandb==0.27.2 gitpython==3.2.1
        gitdb==4.0.12 smmap==5.0.3 sentry-sdk==2.75.0 platformdirs==4.14.8 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        nvidia-ml-py==13.615.71 hydra-joblib-launcher==1.2.0 joblib==1.6.0)
for spec in "${wheels[@]}"; do
  ls .whl | grep -qi "^${spec%%==*}-${spec##*==}-" 2>/dev/null && continue
  ls .whl | grep -qi "^$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
# antlr4-python3-runtime 4.9.3 (hydra/omegaconf need it) exists only as a source package.
ls .whl | grep -q '^antlr4_python3_runtime-4.9.3-' ||
  python3 -m pip wheel -q --no-deps --no-binary=:all: antlr4-python3-runtime==4.9.3 -w .whl
du -sh .whl
