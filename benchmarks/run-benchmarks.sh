#!/usr/bin/env bash
# Reproduce the CPU figures of docs/benchmarks.md: batch against the naive loop and the DataLoader
# script (whole processes, mobilenet_v3_small untrained) on ImageNet-sized and camera-sized JPEGs,
# then the default model's top-1 agreement with its reference preprocessing. The pictures are crops of
# the sample photos, generated afresh and deleted at the end. Run it on an idle machine after the
# README's setup; it runs from the repository root wherever it is called from.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: benchmarks/run-benchmarks.sh [SMALL_IMAGES (3000)] [CAMERA_IMAGES (400)] [AGREEMENT_IMAGES (600)]"
if [[ $# -gt 3 || ${1:-} == -h || ${1:-} == --help ]]; then
    echo "$usage" >&2
    exit 2
fi
small=${1:-3000}
camera=${2:-400}
agreement=${3:-600}
python=${PYTHON:-.venv/bin/python}
untrained=(--model mobilenet_v3_small --weights none)
pictures=$(mktemp -d)
trap 'rm -rf "$pictures"' EXIT

show() {
    printf '\n$ python -m %s\n' "$*"
    "$python" -m "$@" 2>/dev/null
}

generate() {  # FOLDER COUNT WIDTH
    show benchmarks.pictures "$2" --width "$3" --photos tests/data/photos -o "$pictures/$1"
}

echo "$(date -u +%F), $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p'), batch $("$python" -m batch --version | awk '{print $3}')"
generate small "$small" 500
generate camera "$camera" 2000-4000
generate agreement "$agreement" 500
for set in small camera; do
    show batch bench "$pictures/$set" "${untrained[@]}"
    show benchmarks.compare "$pictures/$set" "${untrained[@]}"
done
show benchmarks.compare "$pictures/agreement" --agreement
show benchmarks.compare "$pictures/camera" --agreement
