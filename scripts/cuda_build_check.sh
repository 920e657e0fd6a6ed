#!/usr/bin/env bash
# Compile and link the whole extension, CUDA kernels included, against the CUDA build of torch,
# and import it. Runs on machines without a GPU: nothing is launched, the kernels only have to
# build and load. The environment is cached outside the clone and created when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${DEEPKERN_CUDA_VENV:-$HOME/.cache/deepkern/venv-cuda}"
python="$venv/bin/python"
if [[ ! -x "$python" ]]; then
  echo "cuda_build_check: creating $venv" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$python" -m pip install -q torch==2.14.1 numpy pybind11 "scikit-build-core>=0.10" ninja \
    cmake 2>&1 | { grep -v "^WARNING: Location '" || true; }
fi

export DEEPKERN_CUDA=ON
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
"$python" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/cuda-check . \
  2>&1 | { grep -v "^WARNING: Location '" || true; }

cd /tmp
"$python" - <<'PY'
import deepkern
import torch

info = deepkern.build_info()
print("built:", info)
assert info["cuda"], "the CUDA kernels were not compiled in"
for arch in ("80", "90"):
    assert arch in info["cuda_archs"].split(","), f"sm_{arch} missing from {info['cuda_archs']}"

def registered(key):
    names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
    return {n for n in names if n.startswith("deepkern::")}


cpu, cuda = registered("CPU"), registered("CUDA")
assert cpu and cpu == cuda, f"ops without a CUDA kernel: {sorted(cpu - cuda)}"
print(f"CUDA kernels registered for all {len(cuda)} ops: {sorted(cuda)}")
PY
