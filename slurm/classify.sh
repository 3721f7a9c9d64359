#!/usr/bin/env bash
# Classify a folder of images as a Slurm array: each array task takes its own shard (batch derives it
# from SLURM_ARRAY_TASK_*) and writes part files into the one shared OUTPUT directory.
#
#   sbatch --array=0-15%4 slurm/classify.sh /data/images /scratch/preds [batch classify options]
#
# Every #SBATCH line below is a default: edit it, or override it on the sbatch command line.
# Logs go to the folder you submit from (it always exists; Slurm opens the log before this script
# runs, so a missing logs/ folder would make tasks fail without a word).
#SBATCH --job-name=classify
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# Runtime, chosen by BATCH_RUNTIME:
#   apptainer (default)  apptainer exec --nv --cleanenv with the SIF named by BATCH_SIF
#   podman               podman run with the image named by BATCH_IMAGE (default classify:latest);
#                        GPUs through CDI, BATCH_PODMAN_DEVICES (default nvidia.com/gpu=all, empty: none)
#   none                 the `batch` on PATH
# BATCH_BIND: more paths to bind, comma-separated (the folders a manifest's images live in).
# BATCH_STEP: classify (default); index, pending and summary are slurm/submit.sh's. The summary step
#   also names the tasks of array BATCH_ARRAY_JOB that did not complete, and then fails.
#
# Time limits: Slurm sends USR1 two minutes before the limit (and TERM on `scontrol requeue`); this
# script passes it on, batch commits what it has and exits 75, and the task is requeued: the next
# allocation resumes where it stopped. Submitting the same command again resumes too.
set -euo pipefail

usage() {
    echo "usage: sbatch [--array=0-N%M] $0 INPUT OUTPUT [batch classify options...]" >&2
    echo "       INPUT: a folder, an image list (@file) or a manifest from 'batch index'" >&2
    exit 2
}

(($# >= 2)) || usage
[[ $1 == -* || $2 == -* ]] && usage
input=$1
output=$2
shift 2
step=${BATCH_STEP:-classify}
runtime=${BATCH_RUNTIME:-apptainer}
readonly EXIT_INTERRUPTED=75 # batch committed its work and stopped on a signal

# The container sees each path where it is on the host, so paths in the results are host paths.
folder_of() { if [[ -d $1 ]]; then realpath "$1"; else dirname "$(realpath "$1")"; fi; }
read_only=("$(folder_of "${input#@}")")
writable=("$(folder_of "$output")")

case $step in
    classify) command=(batch classify "$input" -o "$output" "$@") ;;
    index) command=(batch index "$input" -o "$output") ;;
    pending) # INPUT: the manifest, OUTPUT: the results, then TO_DO: the manifest to write
        (($# == 1)) || usage
        command=(batch pending "$input" "$output" -o "$1")
        writable=("$(folder_of "$1")")
        read_only+=("$(folder_of "$output")")
        ;;
    summary) command=(batch summary "$input" --manifest "$output") ;;
    *) echo "BATCH_STEP must be classify, index, pending or summary, not '$step'" >&2 && exit 2 ;;
esac
if [[ $step == classify ]]; then
    mkdir -p "$output"
fi
IFS=',' read -r -a extra <<<"${BATCH_BIND:-}"
read_only+=("${extra[@]}")

# What batch reads from the environment: the shard (array and srun variables), GPUs, CPUs, caches.
forwarded=()
for name in CUDA_VISIBLE_DEVICES TORCH_HOME SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID \
    SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_STEP SLURM_ARRAY_TASK_COUNT \
    SLURM_PROCID SLURM_NTASKS SLURM_CPUS_PER_TASK SLURMD_NODENAME SLURM_JOB_GPUS SLURM_GPUS_ON_NODE; do
    [[ -n ${!name:-} ]] && forwarded+=("$name=${!name}")
done

# Options both container runtimes take; $1 is the runtime's flag for a bind mount.
container_options() {
    options=()
    for path in "${read_only[@]}"; do options+=("$1" "$path:$path:ro"); done
    for path in "${writable[@]}"; do options+=("$1" "$path:$path"); done
    for pair in "${forwarded[@]}"; do options+=(--env "$pair"); done
}

case $runtime in
    apptainer)
        : "${BATCH_SIF:?set BATCH_SIF to the SIF image (batch image sif), or BATCH_RUNTIME=podman|none}"
        container_options --bind
        launcher=(apptainer exec --nv --cleanenv "${options[@]}" "$BATCH_SIF")
        ;;
    podman)
        container_options --volume
        IFS=',' read -r -a cdi <<<"${BATCH_PODMAN_DEVICES-nvidia.com/gpu=all}"
        for device in "${cdi[@]}"; do options+=(--device "$device"); done
        launcher=(podman run --rm "--userns=keep-id:uid=1000,gid=1000" --shm-size=8g "${options[@]}"
            "${BATCH_IMAGE:-classify:latest}")
        ;;
    none) launcher=() ;;
    *) echo "BATCH_RUNTIME must be apptainer, podman or none, not '$runtime'" >&2 && exit 2 ;;
esac

# Our own lines go to stderr (the same log in a job), so a step's stdout is batch's alone.
echo "$(date -Is) ${SLURM_JOB_ID:+job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} }on $(hostname): ${launcher[*]} ${command[*]}" >&2

# Run in the background so this shell can take USR1/TERM and pass it on. A trapped signal ends `wait`
# early, so wait again until the classifier has committed and exited (a zombie still answers kill -0,
# so the last wait always reaps it and gives its own exit status).
child=0
# shellcheck disable=SC2329 # called by the traps
forward() { ((child)) && kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${launcher[@]}" "${command[@]}" &
child=$!
status=0
while kill -0 "$child" 2>/dev/null; do
    status=0
    wait "$child" || status=$?
done

if ((status == EXIT_INTERRUPTED)) && [[ -n ${SLURM_JOB_ID:-} ]]; then
    task=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    echo "$(date -Is) stopped before the end; requeueing ${task:-$SLURM_JOB_ID} to resume" >&2
    scontrol requeue "${task:-$SLURM_JOB_ID}" || echo "requeue refused (already requeued?)" >&2
fi

# Array task states: from accounting where the site keeps it, else from the controller's memory
# (which keeps ended jobs for MinJobAge, 300 s by default: the summary runs right after the array).
task_states() {
    sacct --noheader --parsable2 --allocations --jobs="$1" --format=JobID,State 2>/dev/null ||
        squeue --noheader --array --states=all --jobs="$1" --format='%i|%T'
}
if [[ $step == summary && -n ${BATCH_ARRAY_JOB:-} ]]; then
    failed=$(task_states "$BATCH_ARRAY_JOB" | awk -F'|' '$2 != "COMPLETED" {printf " %s (%s)", $1, $2}')
    if [[ -n $failed ]]; then
        echo "FAILED: array tasks that did not complete:$failed; their logs say why" >&2
        status=1
    fi
fi
exit "$status"
