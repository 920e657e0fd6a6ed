#!/usr/bin/env bash
# Runs `deepkern verify` on every benchmark instance present in the verification data folder
# (ACAS Xu, MNIST, ERAN and the test networks; VNN-COMP timeouts) and prints the table.
# Usage: scripts/verify_instances.sh [DATA_DIR] [extra `deepkern verify` options...]
# DATA_DIR defaults to $DEEPKERN_VERIFICATION_DATA or ../shared/data/verification.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-${DEEPKERN_VERIFICATION_DATA:-$here/../shared/data/verification}}"
shift || true
python="${PYTHON:-$here/.venv/bin/python}"
list="$(mktemp --suffix=.csv)"
trap 'rm -f "$list"' EXIT

# Keep the listed instances whose files are present; paths become absolute.
for category in test acasxu mnistfc eran; do
    folder="$data/$category"
    for csv in "$folder"/*_instances.csv; do
        [ -f "$csv" ] || continue
        while IFS=, read -r onnx vnnlib timeout; do
            onnx="$folder/$(basename "$onnx")"
            vnnlib="$folder/$(basename "$vnnlib")"
            if [ -f "$onnx" ] && [ -f "$vnnlib" ]; then
                echo "$onnx,$vnnlib,${timeout//[$'\r ']/}" >> "$list"
            fi
        done < "$csv"
    done
done

"$python" -m deepkern.cli verify --instances "$list" "$@"
