#!/usr/bin/env bash
# Reproduce the CPU figures of docs/benchmarks.md: batch against the naive loop and the DataLoader
# script (whole processes, mobilenet_v3_small untrained) on ImageNet-sized and camera-sized JPEGs,
# then the default model's top-1 agreement with its reference preprocessing. Run it on an idle
# machine from the repository root after the README's setup; it takes about 10 minutes on 2 cores.
set -euo pipefail

usage="usage: docs/run-benchmarks.sh [SMALL_IMAGES (3000)] [CAMERA_IMAGES (400)]"
if [[ $# -gt 2 || ${1:-} == -h || ${1:-} == --help ]]; then
    echo "$usage" >&2
    exit 2
fi
small=${1:-3000}
camera=${2:-400}
batch=${BATCH:-.venv/bin/batch}
photos=tests/data/photos
untrained=(--model mobilenet_v3_small --weights none)

run() {
    printf '\n$ batch bench %s\n' "$*"
    "$batch" bench "$@" 2>/dev/null
}

echo "$(date -u +%F), $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p'), batch $("$batch" --version | awk '{print $3}')"
run --generate "$small" --width 500 --photos "$photos" "${untrained[@]}" --compare
run --generate "$camera" --width 2000-4000 --photos "$photos" "${untrained[@]}" --compare
run --generate 600 --width 500 --photos "$photos" --agreement
run --generate 400 --width 2000-4000 --photos "$photos" --agreement
