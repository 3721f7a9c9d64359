#!/usr/bin/env bash
# Everything a GPU node shows about batch, in one call of about six minutes on one H100 or H200 with
# 16 cores, most telling first: batch doctor; ResNet-50 (untrained) from ImageNet-sized JPEGs to Parquet,
# decoded by the CPUs and by the GPU, against the model alone and both peers on the same GPU; top-1
# agreement in bf16, fp16 and fp32 (and of GPU decoding) with the CPU's fp32 reference; the JPEG
# decoders alone (torchvision's, TorchCodec's and nvImageCodec's); the GPU tests and the part of the suite a GPU
# changes; the default model; a timm, a Hugging Face and a zero-shot OpenCLIP model; camera-sized JPEGs,
# their agreement with GPU decoding, and the decoders alone on them. It writes OUT/report.md (each
# command, what it printed, its time) and OUT/steps.log (everything); a step that fails is reported and
# the next one runs. A time limit that cuts it short leaves the report of the steps done.
#
#   benchmarks/gpu-check.sh OUT                       # on a GPU node: what docs/benchmarks.md records
#   benchmarks/gpu-check.sh OUT --device cpu --tiny   # anywhere, on a few files: CI runs it so (no test steps)
#
# The lent GPU machines have their own Python 3.12, torch, torchvision, click, pillow, pyarrow, numpy,
# pytest, pytest-xdist, timm and transformers, and reach no registry. Carry the rest as wheels (58 MiB,
# nvImageCodec's and TorchCodec's slimmed to fit a call's 64 MiB), fetched where pip works:
#   echo /.whl/ >>.git/info/exclude && python3 -m benchmarks.carry_wheels .whl
# and there, in the repository root, install them and batch over that torch, then run this:
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . &&
#     PYTHONPATH=/tmp/site benchmarks/gpu-check.sh "$OUT/check"
set -euo pipefail

usage="usage: benchmarks/gpu-check.sh OUT [--device cuda|cpu] [--tiny] [--small N] [--camera N] [--peer-files N]"
(($# >= 1)) && [[ $1 != -* ]] || { echo "$usage" >&2 && exit 2; }
out=$(realpath -m "$1")
shift
device=cuda small=20000 camera=2000 peer_files=2000 tiny=""
while (($#)); do
    case $1 in
        --device) device=$2 && shift 2 ;;
        --tiny) tiny=1 small=24 camera=4 peer_files=8 && shift ;;
        --small) small=$2 && shift 2 ;;
        --camera) camera=$2 && shift 2 ;;
        --peer-files) peer_files=$2 && shift 2 ;;
        *) echo "$usage" >&2 && exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [[ $device == cpu ]]; then precision=fp32 precisions=(fp32 bf16); else precision=bf16 precisions=(bf16 fp16 fp32); fi
batch_size=$([[ -n $tiny ]] && echo 8 || echo 256)
resnet=(--model resnet50 --weights none)
pictures=$(mktemp -d)
trap 'rm -rf "$pictures"' EXIT
mkdir -p "$out"
report=$out/report.md log=$out/steps.log
failed=()

# NAME LIMIT COMMAND...: run it within LIMIT seconds; what it prints goes to the log and (its last 40
# lines) to the report, its errors to the log alone.
step() {
    local name=$1 limit=$2 started=$SECONDS status=0
    shift 2
    printf '\n## %s\n\n```\n$ %s\n' "$name" "$*" >>"$report"
    printf '\n=== %s: %s\n' "$name" "$*" >>"$log"
    # shellcheck disable=SC2094 # both only append: errors and the copy of what it prints interleave
    timeout "$limit" "$@" 2>>"$log" | tee -a "$log" | tail -n 40 >>"$report" || status=$?
    if ((status)); then failed+=("$name"); fi
    printf '```\n%s in %d s\n' "$( ((status)) && echo "FAILED (exit $status)" || echo ok)" $((SECONDS - started)) >>"$report"
}

# NUMBER: the first NUMBER lines of what comes in, reading it all (head would leave sort a SIGPIPE,
# which pipefail turns into the end of this script).
first() { awk -v count="$1" 'NR <= count'; }

# NAME COUNT WIDTH: JPEGs made from crops of the sample photos, as benchmarks/run-benchmarks.sh makes them.
make_pictures() {
    step "pictures: $1" 300 "$python" -m benchmarks.pictures "$2" --width "$3" --photos tests/data/photos -o "$pictures/$1"
}

{
    echo "# gpu-check, $(date -u +%FT%TZ), batch $("$python" -m batch --version | awk '{print $3}'), device $device"
    echo
    echo "$(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p'); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | first 1 || echo 'no nvidia-smi')"
} >"$report"
: >"$log"

step doctor 120 "$python" -m batch doctor
make_pictures small "$small" 500
find "$pictures/small" -name '*.jpg' | sort | first "$peer_files" >"$pictures/sample.txt"
step "ResNet-50 stages and suggested CPUs" 180 "$python" -m batch bench "@$pictures/sample.txt" --device "$device" \
    "${resnet[@]}" --batch-size "$batch_size"
step "ResNet-50 end to end, ImageNet-sized, against the peers" 300 "$python" -m benchmarks.compare "$pictures/small" \
    "${resnet[@]}" --device "$device" --precision "$precision" --batch-size "$batch_size" --peer-files "$peer_files" \
    --decode cpu gpu
make_pictures agreement "$([[ -n $tiny ]] && echo 6 || echo 600)" 500
step "agreement with the CPU's fp32 reference" 300 "$python" -m benchmarks.agreement "$pictures/agreement" \
    --device "$device" --precision "${precisions[@]}" --decode cpu gpu
step "JPEG decoders alone, ImageNet-sized" 120 "$python" -m benchmarks.jpeg_decoders "@$pictures/sample.txt" \
    --device "$device" --batch-size "$batch_size"
if [[ -z $tiny ]]; then
    workers=$(($(nproc) > 12 ? 12 : $(nproc)))
    step "tests: GPU and what a GPU changes" 300 "$python" -m pytest -q -p no:cacheprovider -n "$workers" tests/test_gpu.py \
        tests/test_classify.py tests/test_crash_isolation.py tests/test_network.py -k "not fails_at_first_use"
    step "test: a GPU that fails at first use (alone: it fills the GPU's memory)" 120 "$python" -m pytest -q \
        -p no:cacheprovider tests/test_gpu.py -k fails_at_first_use
fi
step "default model stages" 180 "$python" -m batch bench "@$pictures/sample.txt" --device "$device" --batch-size "$batch_size"
step "default model end to end, ImageNet-sized, against the peers" 300 "$python" -m benchmarks.compare "$pictures/small" \
    --device "$device" --precision "$precision" --batch-size "$batch_size" --peer-files "$peer_files"
step "model families: timm, Hugging Face, OpenCLIP, end to end" 300 "$python" -m benchmarks.families "$pictures/small" \
    --device "$device" --precision "$precision" --batch-size "$batch_size" ${tiny:+--tiny}
make_pictures camera "$camera" 2000-4000
step "ResNet-50 end to end, camera-sized, against the peers" 300 "$python" -m benchmarks.compare "$pictures/camera" \
    "${resnet[@]}" --device "$device" --precision "$precision" --batch-size "$batch_size" --peer-files $((peer_files / 10 + 1)) \
    --decode cpu gpu
find "$pictures/camera" -name '*.jpg' | sort | first "$([[ -n $tiny ]] && echo 4 || echo 200)" >"$pictures/camera.txt"
step "agreement of GPU decoding, camera-sized" 300 "$python" -m benchmarks.agreement "@$pictures/camera.txt" \
    --device "$device" --precision "$precision" --decode cpu gpu
step "JPEG decoders alone, camera-sized" 120 "$python" -m benchmarks.jpeg_decoders "@$pictures/camera.txt" \
    --device "$device" --batch-size "$([[ -n $tiny ]] && echo 2 || echo 32)"

# The headline: ResNet-50 end to end (after start-up), decoded by the CPUs and by the GPU, as a share of
# the model alone, all from above.
model=$(sed -n '/^## ResNet-50 stages/,/^## /s/^  model  *\([0-9.]*\) images\/s.*/\1/p' "$report")
for size in ImageNet camera; do
    for decode in cpu gpu; do
        name=$([[ $decode == cpu ]] && echo "batch classify " || echo "batch classify --decode gpu ")
        whole=$(sed -n "/^## ResNet-50 end to end, $size/,/^## /s/^  $name *[0-9].*then \\([0-9.]*\\) images\\/s.*/\\1/p" "$report")
        [[ -n $model && -n $whole ]] || continue
        awk -v model="$model" -v whole="$whole" -v device="$device" -v size="$size" -v decode="$decode" 'BEGIN {
            printf "\nResNet-50 on %s from %s-sized JPEGs, %s decoding: %.0f images/s end to end after start-up, %.0f%% of the model alone (%.0f images/s)\n",
                device, size, decode, whole, 100 * whole / model, model }' | tee -a "$report"
    done
done
if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "$(IFS=';' && echo "${failed[*]}")" | tee -a "$report" >&2
    exit 1
fi
echo "every step passed; $report"
