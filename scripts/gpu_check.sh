#!/usr/bin/env bash
# Everything deepkern checks on a GPU, in one run: build from source against the machine's own
# torch, run the CUDA tests and the whole op and module suite, run the benchmarks on the device.
# Results (logs, JUnit XML, benchmark JSON) go to the folder given as the only argument.
#
#   bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/machine.txt" 2>&1

# The architecture of the device at hand only: one target compiles fastest.
arch="$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
DEEPKERN_CUDA=ON TORCH_CUDA_ARCH_LIST="$arch" "$python" -m pip install --no-build-isolation \
  --no-deps -C build-dir=build/gpu . > "$out/build.log" 2>&1 || {
  echo "build failed; see build.log"
  tail -40 "$out/build.log"
  exit 1
}
(cd /tmp && "$python" -c "import deepkern, json; print(json.dumps(deepkern.build_info()))") \
  > "$out/build_info.json"

# Tests import the installed package, not the source tree.
"$python" -m pytest tests/ops tests/nn -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  > "$out/tests.log" 2>&1
echo "tests rc=$?" >> "$out/tests.log"

# Every kernel family's benchmark on the device, one JSON and one table each.
families="$(cd /tmp && "$python" -c "from deepkern.bench import FAMILIES; print(*FAMILIES)")"
for family in $families; do
  "$python" -m deepkern.cli bench "$family" --device cuda --json "$out/bench_$family.json" \
    > "$out/bench_$family.txt" 2>&1
  echo "bench rc=$?" >> "$out/bench_$family.txt"
done
tail -3 "$out/tests.log"
for family in $families; do tail -30 "$out/bench_$family.txt"; done
