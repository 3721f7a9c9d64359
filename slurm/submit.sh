#!/usr/bin/env bash
# Index a folder in a job of its own and wait for it, size an array job from the images that have no
# result yet, submit it, and submit a summary job that runs after it whatever happened and fails loudly
# if any task failed or any image is missing or doubled. Run it again when the tree has grown: only the
# new images are classified. With --retry-failed among the options, the images whose rows failed are
# redone too.
#
#   slurm/submit.sh /data/images /scratch/preds [batch classify options]
#
# IMAGES_PER_TASK  images per array task (default 50000). Aim for tasks of minutes, not hours, so a
#                  requeue loses little and the scheduler can backfill: `batch bench` or a trial
#                  run tells your images/s. Capped so the array fits the cluster's MaxArraySize.
# MAX_RUNNING      array tasks running at once (default 16)
# SBATCH_OPTIONS   more sbatch options for the array, e.g. "--partition=gpu --cpus-per-task=16"
# CPU_SBATCH_OPTIONS  more sbatch options for the index and summary jobs, which need no GPU,
#                  e.g. "--partition=cpu --account=myproject"
# INDEX_CPUS       CPUs of the index job (default 8): it lists tars and Parquet files of images one per CPU
# INDEX_TIME       time limit of the index job (default 04:00:00). It walks the tree, one stat a file
#                  (32 at once on a network file system): 10^8 names took 16 minutes on a local disk
#                  (docs/benchmarks.md), and 4 hours allow 7,000 stats a second for them.
# MANIFEST         where the index goes (default: OUTPUT-manifest.parquet, beside OUTPUT); the
#                  images still to do go beside it, in MANIFEST-todo.parquet
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
index_cpus=${INDEX_CPUS:-8}
for number in "$per_task" "$max_running" "$index_cpus"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || { echo "IMAGES_PER_TASK, MAX_RUNNING and INDEX_CPUS must be positive integers" >&2 && exit 2; }
done
read -r -a cpu_options <<<"${CPU_SBATCH_OPTIONS:-}"
# What the index, pending and summary steps hold does not grow with the tree: at 10^8 names each peaked
# under 1.5 GiB, within the budget batch gives them (docs/benchmarks.md); 2G is that budget and more.
readonly BOOKKEEPING_MEMORY=2G
to_do=${manifest%.parquet}-todo.parquet
# --retry-failed (and --retry-kind) among the classify options: the failed rows are to do as well.
retry=()
for ((i = 1; i <= $#; i++)); do
    case ${!i} in
        --retry-failed | --retry-kind=*) retry+=("${!i}") ;;
        --retry-kind) ((i < $#)) && next=$((i + 1)) && retry+=("${!i}" "${!next}") ;;
    esac
done

# Index once, through the same runtime the tasks use, then write what has no row yet: one job on a node
# of its own (not this login node), which this script waits for. Both steps print what they counted.
facts=${to_do%.parquet}.counts
steps="$(printf '%q ' env BATCH_STEP=index "$here/classify.sh" "$input" "$manifest") && "
steps+="$(printf '%q ' env BATCH_STEP=pending "$here/classify.sh" "$manifest" "$output" "$to_do" ${retry[@]+"${retry[@]}"})"
index_time=${INDEX_TIME:-04:00:00}
index_options=(--job-name=classify-index --output=%x-%j.out --gres=none --cpus-per-task="$index_cpus"
    --mem="$BOOKKEEPING_MEMORY" --time="$index_time" --no-requeue ${cpu_options[@]+"${cpu_options[@]}"})
# A job that no node can hold is accepted and pends for ever (reason PartitionConfig): ask Slurm first.
if ! refusal=$(sbatch --test-only "${index_options[@]}" --wrap=true 2>&1); then
    echo "the index job ($index_cpus CPUs, $BOOKKEEPING_MEMORY, $index_time) cannot run on this cluster: $refusal" >&2
    echo "set INDEX_CPUS, INDEX_TIME or CPU_SBATCH_OPTIONS (--partition=...) to what its nodes allow" >&2
    exit 2
fi
echo "indexing $input in a job of $index_cpus CPUs, $BOOKKEEPING_MEMORY and $index_time at most; waiting for it" >&2
if ! index_job=$(sbatch --parsable --wait "${index_options[@]}" --wrap="{ $steps; } > $(printf '%q' "$facts")"); then
    echo "the index job ${index_job%%;*} failed: see $PWD/classify-index-${index_job%%;*}.out" >&2
    rm -f "$facts"
    exit 1
fi
indexed=$(awk '$1 == "indexed" {print $2}' "$facts")
count=$(tail -n 1 "$facts")
rm -f "$facts"
[[ $indexed =~ ^[0-9]+$ && $count =~ ^[0-9]+$ ]] || { echo "the index job did not print its counts" >&2 && exit 1; }
echo "indexed $indexed images into $manifest" >&2
if ((count == 0)); then
    echo "nothing to classify: every image in $manifest has a row in $output"
    exit 0
fi

# Array indices must stay below MaxArraySize, and a task takes at least one of batch's 65536 buckets.
max_array=$(scontrol show config | awk '$1 == "MaxArraySize" {print $3}')
((max_array > 65536)) && max_array=65536
tasks=$(((count + per_task - 1) / per_task))
if ((tasks > max_array)); then
    echo "$tasks tasks of $per_task would pass MaxArraySize=$max_array: using $max_array larger tasks" >&2
    tasks=$max_array
fi

# The tasks read the to-do manifest; the images stay where they are, so bind their folder too.
read -r -a options <<<"${SBATCH_OPTIONS:-}"
array=$(BATCH_BIND=$(realpath "$input") sbatch --parsable --array="0-$((tasks - 1))%$max_running" "${options[@]}" \
    "$here/classify.sh" "$to_do" "$output" "$@")
array=${array%%;*}
# The summary reads every row: 128 s for 10^8 on 2 cores (docs/benchmarks.md); ten times that, and an hour at least.
summary_minutes=$((indexed * 128 / 10 / 1000000 / 60 + 1))
((summary_minutes < 60)) && summary_minutes=60
summary=$(BATCH_STEP=summary BATCH_ARRAY_JOB=$array sbatch --parsable --dependency="afterany:$array" \
    --job-name=classify-summary --output=%x-%j.out --gres=none --cpus-per-task=2 --mem=$BOOKKEEPING_MEMORY \
    --time=$summary_minutes --no-requeue ${cpu_options[@]+"${cpu_options[@]}"} "$here/classify.sh" "$output" "$manifest")
summary=${summary%%;*}

cat <<EOF
$count images to classify in $tasks array tasks of about $(((count + tasks - 1) / tasks)), at most $max_running at once
array job:   $array   logs: $PWD/classify-${array}_<task>.out
summary job: $summary   log:  $PWD/classify-summary-$summary.out (runs when every task has ended; fails if any failed)
results:     $output   manifest: $manifest   to do: $to_do
follow with: squeue --me; then: batch summary $output --manifest $manifest
EOF
