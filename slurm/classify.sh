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
#                        GPUs through CDI: nvidia.com/gpu=N for each GPU Slurm allotted (none in a job
#                        without GPUs, all outside Slurm), or BATCH_PODMAN_DEVICES (comma-separated;
#                        empty: none)
#   none                 the `batch` on PATH
# BATCH_BIND: more paths to bind, comma-separated (the folders a manifest's images live in).
# BATCH_STEP: classify (default); index, pending and summary are slurm/submit.sh's. The summary step
#   also names the tasks of array BATCH_ARRAY_JOB that did not complete, and then fails.
# BATCH_MAX_REQUEUES: how many times a task may requeue itself (default 10; Slurm counts them in
#   SLURM_RESTART_COUNT); then it says so and fails, and submitting the same command again goes on.
#
# Signals: Slurm sends USR1 two minutes before the time limit; this script passes it on, batch commits
# what it has and exits 75, and the script requeues the task: the next allocation resumes where it
# stopped. TERM (scancel; Slurm's own requeue or preemption) is passed on too, so batch commits, but
# never requeues here. Whenever the signal comes, the task ends with batch's own status.
# With --ntasks=N the script runs itself once per task through srun, and each task takes its own
# shard; srun passes the signals on to them. Submitting the same command again resumes too.
set -euo pipefail +o posix # not posix mode: there `wait` forgets a status once told (see run_child)

# From the start, so that a signal that comes before batch does is not lost: see run_child below.
stop="" # USR1 or TERM: the signal that asked us to stop (TERM, once seen, stays)
child=0 # the pid of batch (or of its runtime, or srun)
pass_on() { ((child)) && kill -s "$1" "$child" 2>/dev/null || true; }
# shellcheck disable=SC2329 # called by the traps
on_signal() {
    echo "$(date -Is) received SIG$1" >&2
    [[ $stop == TERM ]] || stop=$1
    interrupted=1
    pass_on "$1"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

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
max_requeues=${BATCH_MAX_REQUEUES:-10}
[[ $max_requeues =~ ^[0-9]+$ ]] || { echo "BATCH_MAX_REQUEUES must be a whole number, not '$max_requeues'" >&2 && exit 2; }
readonly EXIT_INTERRUPTED=75 # batch committed its work and stopped on a signal

# The container sees each path where it is on the host, so paths in the results are host paths.
folder_of() { if [[ -d $1 ]]; then realpath "$1"; else dirname "$(realpath "$1")"; fi; }
read_only=("$(folder_of "${input#@}")")
writable=("$(folder_of "$output")")

case $step in
    classify) command=(batch classify "$input" -o "$output" "$@") ;;
    index) command=(batch index "$input" -o "$output") ;;
    pending) # INPUT: the manifest, OUTPUT: the results, then TO_DO: the manifest to write, then options
        (($# >= 1)) || usage
        command=(batch pending "$input" "$output" -o "$@")
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

# What batch reads from the environment: the shard (array and srun variables), GPUs (which were promised,
# and which of them this task takes), CPUs, memory, caches.
# CUDA_VISIBLE_DEVICES is the runtime's own (below).
forwarded=()
for name in TORCH_HOME SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID \
    SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_STEP SLURM_ARRAY_TASK_COUNT \
    SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_CPUS_PER_TASK SLURM_MEM_PER_NODE SLURM_MEM_PER_CPU \
    SLURMD_NODENAME SLURM_JOB_GPUS SLURM_STEP_GPUS SLURM_GPUS_ON_NODE; do
    [[ -n ${!name:-} ]] && forwarded+=("$name=${!name}")
done

# The GPUs Slurm allotted, by their indices on the node: SLURM_STEP_GPUS in an srun step, SLURM_JOB_GPUS in
# the batch step. CUDA_VISIBLE_DEVICES is not that: where Slurm constrains devices (cgroups) it numbers
# the allotted GPUs from 0, as CUDA in the job sees them.
IFS=',' read -r -a allotted <<<"${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-}}"
visible=${CUDA_VISIBLE_DEVICES:-} # CUDA_VISIBLE_DEVICES inside the container

# Options both container runtimes take; $1 is the runtime's flag for a bind mount. A folder both read
# and written (the pending step's manifest beside its to-do list) is bound once, writable.
is_writable() {
    local path
    for path in "${writable[@]}"; do [[ $1 == "$path" ]] && return 0; done
    return 1
}
container_options() {
    options=()
    for path in "${read_only[@]}"; do
        if ! is_writable "$path"; then options+=("$1" "$path:$path:ro"); fi
    done
    for path in "${writable[@]}"; do options+=("$1" "$path:$path"); done
    for pair in "${forwarded[@]}" ${visible:+"CUDA_VISIBLE_DEVICES=$visible"}; do options+=(--env "$pair"); done
}

# index, pending and summary spill past their memory budget into TMPDIR: where the host sets one (Slurm
# sites point it at node-local scratch), the same folder in the container, not the container's own /tmp.
if [[ $step != classify && -n ${TMPDIR:-} ]]; then
    spill=$(realpath "$TMPDIR")
    is_writable "$spill" || writable+=("$spill")
    forwarded+=("TMPDIR=$spill")
fi

case $runtime in
    apptainer) # --nv binds the node's GPUs; CUDA there sees what it sees here: Slurm's numbering holds
        : "${BATCH_SIF:?set BATCH_SIF to the SIF image (batch image sif), or BATCH_RUNTIME=podman|none}"
        container_options --bind
        launcher=(apptainer exec --nv --cleanenv "${options[@]}" "$BATCH_SIF")
        ;;
    podman) # the container gets exactly the allotted GPUs (CDI names them by node index) and numbers them from 0
        if [[ -n ${BATCH_PODMAN_DEVICES+set} ]]; then
            IFS=',' read -r -a cdi <<<"$BATCH_PODMAN_DEVICES"
        elif ((${#allotted[@]})); then
            cdi=("${allotted[@]/#/nvidia.com/gpu=}")
            visible=$(seq -s, 0 $((${#allotted[@]} - 1)))
        elif [[ -n ${SLURM_JOB_ID:-} ]]; then
            cdi=() # a job without GPUs
        else
            cdi=(nvidia.com/gpu=all)
        fi
        container_options --volume
        for device in "${cdi[@]}"; do options+=(--device "$device"); done
        launcher=(podman run --rm "--userns=keep-id:uid=1000,gid=1000" "${options[@]}"
            "${BATCH_IMAGE:-classify:latest}")
        command=("${command[@]:1}") # the image's entrypoint is batch
        ;;
    none) launcher=() ;;
    *) echo "BATCH_RUNTIME must be apptainer, podman or none, not '$runtime'" >&2 && exit 2 ;;
esac

# Our own lines go to stderr (the same log in a job), so a step's stdout is batch's alone.
echo "$(date -Is) ${SLURM_JOB_ID:+job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} }on $(hostname): ${launcher[*]} ${command[*]}" >&2

# Several tasks in the batch step (sbatch --ntasks=N without srun): run this same script once per task
# through srun, so each has its own SLURM_PROCID and so its own shard; its text, so that no node needs
# its path. srun of Slurm 22.05 does not take --cpus-per-task from the job: pass it. Where the node has
# a GPU for each of its tasks, each task gets its own (--gpus-per-task=1; Slurm refuses the step where
# there are fewer); else they share them, and batch spreads them over the GPUs by SLURM_LOCALID.
if ((${SLURM_NTASKS:-1} > 1)) && [[ -z ${SLURM_STEP_ID:-} ]]; then
    tasks_here=${SLURM_TASKS_PER_NODE:-$SLURM_NTASKS} # "2", "2(x3)" or "3,2": this node's comes first
    tasks_here=${tasks_here%%[(,]*}
    each_gpu=()
    if ((${#allotted[@]} && ${#allotted[@]} >= tasks_here)); then each_gpu=(--gpus-per-task=1); fi
    echo "$(date -Is) $SLURM_NTASKS tasks: each runs this script through srun${each_gpu:+ with a GPU of its own}" >&2
    launcher=(srun ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"} "${each_gpu[@]}" bash -c "$(<"$0")" "$0")
    command=("$input" "$output" "$@")
fi

# Run in the background so this shell can take USR1/TERM and pass them on. Every interleaving ends with
# the child's own status: a signal before the start stops before it (75, as batch would), and one that
# came while the child was being started is passed on at once. A child killed by the signal itself,
# before it could catch it, stopped before the end too: 75.
run_child() {
    if [[ -n $stop ]]; then
        echo "$(date -Is) stopped by SIG$stop before batch started" >&2
        status=$EXIT_INTERRUPTED
        return
    fi
    "${launcher[@]}" "${command[@]}" &
    child=$!
    [[ -z $stop ]] || pass_on "$stop"
    # Poll, not `wait`: a trapped signal that ends `wait` as the child ends can lose its status (waitpid
    # took it, bash had not stored it yet; `wait` then says 255). A foreground sleep defers the trap;
    # Slurm may signal the sleep too, which then ends early (quietly).
    while kill -0 "$child" 2>/dev/null; do { sleep 1 || true; } 2>/dev/null; done
    # Now bash has reaped it and keeps its status, telling it to every `wait`. A trapped signal still
    # ends `wait` early (128+signal) and sets `interrupted`: then ask again.
    interrupted=1
    while ((interrupted)); do
        interrupted=0
        status=0
        wait "$child" || status=$?
    done
    if [[ -n $stop ]] && ((status == 128 + $(kill -l "$stop"))); then
        status=$EXIT_INTERRUPTED
    fi
}
run_child

# Requeue only on USR1, the time-limit warning, and only from a job's batch step (not from each task).
if ((status == EXIT_INTERRUPTED)) && [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} ]]; then
    task=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    case $stop in
        TERM) echo "$(date -Is) stopped by SIGTERM (scancel, or Slurm requeueing or preempting the job): not requeueing" >&2 ;;
        USR1)
            if ((${SLURM_RESTART_COUNT:-0} >= max_requeues)); then
                echo "$(date -Is) requeued ${SLURM_RESTART_COUNT:-0} times already (BATCH_MAX_REQUEUES=$max_requeues): not requeueing; resubmit to go on" >&2
            else
                echo "$(date -Is) stopped by SIGUSR1 before the time limit; requeueing ${task:-$SLURM_JOB_ID} to resume" >&2
                scontrol requeue "${task:-$SLURM_JOB_ID}" || echo "requeue refused (already requeued?)" >&2
            fi
            ;;
    esac
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
