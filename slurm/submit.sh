#!/usr/bin/env bash
# Index a folder once, size an array job from the number of images, submit it, and submit a summary
# job that runs after it and fails loudly if any image is missing or doubled.
#
#   slurm/submit.sh /data/images /scratch/preds [batch classify options]
#
# IMAGES_PER_TASK  images per array task (default 50000). Aim for tasks of minutes, not hours, so a
#                  requeue loses little and the scheduler can backfill: `batch bench` or a trial
#                  run tells your images/s.
# MAX_RUNNING      array tasks running at once (default 16)
# SBATCH_OPTIONS   more sbatch options for the array, e.g. "--partition=gpu --cpus-per-task=16"
# MANIFEST         where the index goes (default: OUTPUT-manifest.parquet, beside OUTPUT)
# The runtime variables of slurm/classify.sh (BATCH_RUNTIME, BATCH_SIF, BATCH_IMAGE...) apply here too.
set -euo pipefail

usage() {
    echo "usage: $0 INPUT OUTPUT [batch classify options...]" >&2
    exit 2
}

(($# >= 2)) || usage
[[ $1 == -* || $2 == -* ]] && usage
input=$1
output=${2%/}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
manifest=${MANIFEST:-$output-manifest.parquet}
per_task=${IMAGES_PER_TASK:-50000}
max_running=${MAX_RUNNING:-16}
for number in "$per_task" "$max_running"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || { echo "IMAGES_PER_TASK and MAX_RUNNING must be positive integers" >&2 && exit 2; }
done

# Index once, on this node, through the same runtime the tasks use; batch prints "indexed N images".
indexed=$(BATCH_STEP=index "$here/classify.sh" "$input" "$manifest")
echo "$indexed"
count=$(sed -n 's/^indexed \([0-9]*\) images.*/\1/p' <<<"$indexed")
((count > 0)) || { echo "no images found in $input" >&2 && exit 1; }
tasks=$(((count + per_task - 1) / per_task))

# The tasks read the manifest; the images stay where they are, so bind their folder too.
read -r -a options <<<"${SBATCH_OPTIONS:-}"
array=$(BATCH_BIND=$(realpath "$input") sbatch --parsable --array="0-$((tasks - 1))%$max_running" "${options[@]}" \
    "$here/classify.sh" "$manifest" "$output" "$@")
array=${array%%;*}
summary=$(BATCH_STEP=summary sbatch --parsable --dependency="afterok:$array" --job-name=classify-summary \
    --output=%x-%j.out --gres=none --cpus-per-task=1 --mem=4G --time=01:00:00 --no-requeue \
    "$here/classify.sh" "$output" "$manifest")
summary=${summary%%;*}

cat <<EOF
$count images in $tasks array tasks of up to $per_task, at most $max_running at once
array job:   $array   logs: $PWD/classify-${array}_<task>.out
summary job: $summary   log:  $PWD/classify-summary-$summary.out (runs after every task succeeded)
results:     $output   manifest: $manifest
follow with: squeue --me; then: batch summary $output --manifest $manifest
EOF
