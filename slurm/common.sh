# shellcheck shell=bash
# Shared launcher logic for the sap-ds sbatch templates. Sourced, never executed. Each
# template first sets up the environment (SAP_DS_SETUP, SAP_DS_VENV, SAP_DS_CONDA_ENV), then
# sources this file from a checkout's slurm/ ($SAP_DS_ROOT, default the submit folder) or,
# failing that, from the installed sap-ds package (sap_ds/shipped/slurm/), and calls:
#
#     sapds_setup
#     sapds_run_trainer            # or: sapds_run_single <command...>
#
# What it does:
#   * working folder: $SAP_DS_ROOT (default: the folder the job was submitted from); CONFIG,
#     OUTPUT_DIR and LOG_ROOT may be relative to it. The trainer runs as `python -m
#     sap_ds.train`, so a checkout (its root as the working folder) and a pip install work alike;
#   * one job per OUTPUT_DIR: the default OUTPUT_DIR holds no job id (a resubmitted finished
#     job is recognised and does nothing), so a job refuses a folder that another running job
#     has claimed ($OUTPUT_DIR/.slurm_job);
#   * rendezvous: MASTER_ADDR = first host of the allocation, MASTER_PORT derived from the
#     job id (both overridable), one torchrun per node through srun;
#   * network: NCCL settings for InfiniBand or AWS EFA (SAP_DS_NET), left alone otherwise;
#   * logs: logs/<job name>-<job id>/ with the batch log and one log per node and restart;
#   * preemption: the batch shell traps SIGUSR1 (sent by `#SBATCH --signal=B:USR1@<s>`),
#     asks the trainer to checkpoint and stop through the stop file, waits for it, and
#     requeues the job when the trainer left <output_dir>/REQUEUE behind. The requeued job
#     runs this script again and the trainer resumes from <output_dir>/checkpoints/latest.
#
# Every variable below can be set with `sbatch --export=ALL,VAR=value,... <template>`.

sapds_log() { echo "[sap-ds $(date '+%F %T')] $*"; }

# --------------------------------------------------------------------------- setup
sapds_setup() {
    : "${SLURM_JOB_ID:?these templates must run under sbatch (SLURM_JOB_ID is not set)}"
    SAP_DS_ROOT="${SAP_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$SAP_DS_ROOT" || { echo "cannot cd to SAP_DS_ROOT=$SAP_DS_ROOT" >&2; exit 1; }
    # The Python environment was set up by the template before it sourced this file
    # (SAP_DS_SETUP, SAP_DS_VENV, SAP_DS_CONDA_ENV): it had to find sap_ds to find this file.
    PYTHON="${PYTHON:-python}"

    # Per-job log folder (same folder across requeues: the job id does not change).
    JOB_NAME="${SLURM_JOB_NAME:-sap-ds}"
    RESTART="${SLURM_RESTART_COUNT:-0}"
    LOG_DIR="${LOG_DIR:-${LOG_ROOT:-$SAP_DS_ROOT/logs}/${JOB_NAME}-${SLURM_JOB_ID}}"
    mkdir -p "$LOG_DIR"
    echo "sap-ds: batch log -> $LOG_DIR/batch.log"
    exec >>"$LOG_DIR/batch.log" 2>&1
    sapds_log "job $SLURM_JOB_ID ($JOB_NAME) restart $RESTART on ${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-1} node(s))"
    local package
    package="$("$PYTHON" -c 'import os, sap_ds; print(os.path.dirname(sap_ds.__file__))' 2>&1)" || {
        sapds_log "$PYTHON cannot import sap_ds ($package): set up the environment with SAP_DS_SETUP, SAP_DS_VENV or SAP_DS_CONDA_ENV"
        exit 1
    }
    sapds_log "working folder $PWD; sap_ds from $package ($(command -v "$PYTHON")); common.sh ${BASH_SOURCE[0]}"

    # Rendezvous. Fake or unresolvable node names (tests): set MASTER_ADDR=127.0.0.1.
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    fi
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    NNODES="${SLURM_NNODES:-1}"
    export MASTER_ADDR MASTER_PORT

    # Trainer output + the preemption stop file (the trainer checks it every step).
    export OUTPUT_DIR
    mkdir -p "$OUTPUT_DIR"
    sapds_claim_output_dir
    export SAP_DS_STOP_FILE="${SAP_DS_STOP_FILE:-$OUTPUT_DIR/STOP}"
    # A stop file from before this job asked an earlier one to stop: it must not stop this run (the
    # trainer removes one older than its start as well, for runs started by hand).
    rm -f "$SAP_DS_STOP_FILE"

    if [ "${SAP_DS_CPU:-0}" = "1" ]; then
        # CPU test runs (the SLURM integration tests): DeepSpeed's CPU accelerator, gloo
        # (chosen by the run config's deepspeed_config), one thread per rank.
        export DS_ACCELERATOR=cpu
        export OMP_NUM_THREADS=1
        export CUDA_VISIBLE_DEVICES=""
    else
        # On GPUs DS_ACCELERATOR is left alone: DeepSpeed detects CUDA itself.
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
        sapds_network
    fi
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    sapds_node_local_caches
    export PYTHONUNBUFFERED=1
    export PYTHONFAULTHANDLER=1

    sapds_log "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES GPUS_PER_NODE=${GPUS_PER_NODE:-?}"
    sapds_log "CONFIG=${CONFIG:-} OUTPUT_DIR=$OUTPUT_DIR EXTRA_ARGS=${EXTRA_ARGS:-} SAP_DS_NET=${SAP_DS_NET:-auto} SAP_DS_CPU=${SAP_DS_CPU:-0}"
    sapds_log "TRITON_CACHE_DIR=$TRITON_CACHE_DIR TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR NCCL_PROTO=${NCCL_PROTO:-unset, NCCL decides}"
    trap sapds_on_usr1 USR1
    trap sapds_on_term TERM
}

# Compile caches on node-local disk: by default every rank of every node would compile into
# the (NFS) home, 64 ranks writing and locking the same folder at start. Triton's (~/.triton:
# the SAP kernels) and torch's C++ extensions' (~/.cache/torch_extensions: DeepSpeed builds
# CPU Adam there on first use under optimizer offload).
sapds_node_local_caches() {
    local user="${USER:-$(id -u)}"
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-$user}"
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch-extensions-$user}"
}

# One job at a time in an OUTPUT_DIR: two jobs training into one folder would overwrite each
# other's checkpoints. The folder records the job that last ran in it; a job refuses it while
# that other job is still running (a requeued job keeps its id, so it passes; so does a
# resubmission once the earlier job has ended: the trainer then resumes or, for a finished
# run, says it is done).
sapds_claim_output_dir() {
    local claim="$OUTPUT_DIR/.slurm_job" holder state
    holder="$(cat "$claim" 2>/dev/null || true)"
    if [ -n "$holder" ] && [ "$holder" != "$SLURM_JOB_ID" ]; then
        state="$(squeue -h -j "$holder" -o %T 2>/dev/null | head -n1)"
        case "$state" in
            RUNNING|COMPLETING|CONFIGURING|SUSPENDED|STOPPED|SIGNALING|RESIZING)
                sapds_log "OUTPUT_DIR=$OUTPUT_DIR is in use by job $holder ($state): not starting a second run in it." \
                    "Wait for that job, cancel it, or give this one another OUTPUT_DIR."
                exit 1
                ;;
        esac
    fi
    echo "$SLURM_JOB_ID" >"$claim"
}

# --------------------------------------------------------------------------- network
# SAP_DS_NET picks the interconnect settings. Everything uses ${VAR:=default}, so a value
# exported by the user (or the site's module system) always wins.
#   auto    (default) leave NCCL to its own detection; right on most IB clusters.
#   ib      InfiniBand / RoCE clusters (H100 SXM nodes with ConnectX-7, 8x NDR 400 Gb/s).
#   efa     AWS p4d/p5 (Elastic Fabric Adapter through the aws-ofi-nccl plugin).
#   socket  no RDMA at all (TCP only; slow, for debugging).
sapds_network() {
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"          # INFO to see the chosen transport/rings
    case "${SAP_DS_NET:-auto}" in
        ib)
            # HCAs NCCL may use: every mlx5 port (exclude a storage/bond port with ^mlx5_bond_0).
            : "${NCCL_IB_HCA:=mlx5}"
            # Interface for NCCL's TCP bootstrap (not the data path): anything but loopback/docker.
            : "${NCCL_SOCKET_IFNAME:=^lo,docker0}"
            # RoCE v2 needs the GID index of the RoCE v2 address (usually 3); pure IB ignores it.
            # Set it only on RoCE: export NCCL_IB_GID_INDEX=3
            : "${NCCL_IB_TIMEOUT:=22}"                 # longer IB retry timeout for big jobs
            : "${NCCL_NET_GDR_LEVEL:=PHB}"             # GPUDirect RDMA when GPU and NIC share a PCIe host bridge
            export NCCL_IB_HCA NCCL_SOCKET_IFNAME NCCL_IB_TIMEOUT NCCL_NET_GDR_LEVEL
            ;;
        efa)
            # AWS EFA: libfabric's efa provider under the aws-ofi-nccl plugin.
            : "${FI_PROVIDER:=efa}"
            : "${FI_EFA_USE_DEVICE_RDMA:=1}"           # p4d/p5: GPUDirect RDMA over EFA
            : "${FI_EFA_FORK_SAFE:=1}"                 # dataloader workers fork
            # NCCL_PROTO is not set: forcing Simple was a workaround for aws-ofi-nccl < 1.7,
            # and current plugins choose the protocol per message size (LL/LL128 for small
            # ones); nothing measured here says Simple is faster. Export NCCL_PROTO=simple
            # yourself on an old plugin (a value you export is kept).
            : "${NCCL_SOCKET_IFNAME:=^lo,docker0,veth}"
            export FI_PROVIDER FI_EFA_USE_DEVICE_RDMA FI_EFA_FORK_SAFE NCCL_SOCKET_IFNAME
            ;;
        socket)
            : "${NCCL_IB_DISABLE:=1}"
            : "${NCCL_SOCKET_IFNAME:=^lo,docker0}"
            export NCCL_IB_DISABLE NCCL_SOCKET_IFNAME
            ;;
        auto) ;;
        *) sapds_log "unknown SAP_DS_NET='${SAP_DS_NET}' (auto|ib|efa|socket); leaving NCCL defaults" ;;
    esac
    sapds_gloo_interface
}

# gloo (sap-ds's wait group, the data cache's group) binds the address the host name resolves
# to unless GLOO_SOCKET_IFNAME names an interface; where that is loopback (127.0.1.1 on
# Debian-style hosts) or an address other nodes cannot reach, group creation hangs before
# step 1. gloo takes interface names, not NCCL's ^ exclusions, so it gets the first up IPv4
# interface that NCCL_SOCKET_IFNAME's rule admits (NCCL's own default, ^lo,docker, when it is
# unset). Picked on the batch host and passed to every node by srun: on nodes whose interface
# names differ, export GLOO_SOCKET_IFNAME yourself (a value you export is kept).
sapds_gloo_interface() {
    if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
        export GLOO_SOCKET_IFNAME
        sapds_log "GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME (exported before the job)"
        return
    fi
    local rule="${NCCL_SOCKET_IFNAME:-^lo,docker}" name
    name="$(sapds_first_interface "$rule")"
    if [ -n "$name" ]; then
        export GLOO_SOCKET_IFNAME="$name"
        sapds_log "GLOO_SOCKET_IFNAME=$name (the first up IPv4 interface that NCCL_SOCKET_IFNAME=$rule admits)"
    else
        sapds_log "WARNING: GLOO_SOCKET_IFNAME is unset: no up IPv4 interface that NCCL_SOCKET_IFNAME=$rule admits" \
            "(\`ip -o -4 addr show up\`). gloo binds the address $(hostname) resolves to, which must be reachable" \
            "from every node on a multi-node job; export GLOO_SOCKET_IFNAME=<interface> otherwise"
    fi
}

# The first interface of `ip -o -4 addr show up` (in its order) that an NCCL_SOCKET_IFNAME rule
# admits: "a,b" names starting with a or b, "^a,b" all others, "=" before either whole names.
sapds_first_interface() {
    local rule="$1" exclude=0 exact=0 name prefix listed
    local -a prefixes
    case "$rule" in ^*) exclude=1; rule="${rule#^}" ;; esac
    case "$rule" in =*) exact=1; rule="${rule#=}" ;; esac
    IFS=, read -r -a prefixes <<<"$rule"
    for name in $(ip -o -4 addr show up 2>/dev/null | awk '{print $2}'); do
        name="${name%%@*}"
        listed=0
        for prefix in "${prefixes[@]}"; do
            if { [ "$exact" = 1 ] && [ "$name" = "$prefix" ]; } || { [ "$exact" = 0 ] && [[ "$name" == "$prefix"* ]]; }; then
                listed=1
                break
            fi
        done
        if [ "$listed" != "$exclude" ]; then
            echo "$name"
            return
        fi
    done
}

# --------------------------------------------------------------------------- signals
# Why the batch shell does this itself:
#  * `#SBATCH --signal=B:USR1@600` delivers USR1 to the batch shell only, 600 s before the
#    time limit (or when the site's preemption sends it). Without "B:" Slurm would signal
#    the job steps instead, and torchrun does not forward USR1 to its workers: Python's
#    default action for USR1 is to die, so the torchrun agent would exit without a
#    checkpoint. Hence USR1 is NOT forwarded to srun; the trainer is told through the
#    stop file, which every rank sees on the shared file system and checks each step.
#  * bash runs a trap only between commands: while a foreground `srun` runs, the trap
#    waits until srun ends. So srun runs in the background and the shell sits in `wait`,
#    which a trapped signal interrupts (status > 128); the loop then waits again.
SAPDS_STOP_REQUESTED=0
sapds_on_usr1() {
    SAPDS_STOP_REQUESTED=1
    sapds_log "got SIGUSR1 (time limit / preemption warning): touching $SAP_DS_STOP_FILE"
    touch "$SAP_DS_STOP_FILE"
}
sapds_on_term() {
    # scancel or a preemption with GraceTime: Slurm also sends SIGTERM to the job steps
    # (srun forwards it to torchrun, torchrun to the workers, the trainer checkpoints on
    # SIGTERM). The stop file makes the trainer stop even if the signal got lost.
    SAPDS_STOP_REQUESTED=1
    sapds_log "got SIGTERM: touching $SAP_DS_STOP_FILE"
    touch "$SAP_DS_STOP_FILE"
}

# Run "$@" in the background and wait for it, letting traps fire. Sets SAPDS_RC.
sapds_wait_bg() {
    "$@" &
    local pid=$!
    while true; do
        wait "$pid"
        SAPDS_RC=$?
        # > 128: `wait` was interrupted by a trapped signal; the child is still running.
        if [ "$SAPDS_RC" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        break
    done
}

# After the trainer exits: requeue when it checkpointed because it was asked to stop. The
# trainer's REQUEUE marker decides, not the exit status: the trainer exits 75 ("stopped,
# resumable"), but torchrun reports any non-zero rank as its own exit 1.
SAPDS_EXIT_STOPPED=75
sapds_finish() {
    local rc=$1
    if [ -f "$OUTPUT_DIR/REQUEUE" ]; then
        rm -f "$OUTPUT_DIR/REQUEUE" "$SAP_DS_STOP_FILE"
        sapds_log "trainer checkpointed and asked for a requeue (launcher exit $rc): scontrol requeue $SLURM_JOB_ID"
        # The job goes back to PENDING with the same id; on restart this script runs again
        # (SLURM_RESTART_COUNT+1) and the trainer resumes from checkpoints/latest.
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    rm -f "$SAP_DS_STOP_FILE"
    if [ "$SAPDS_STOP_REQUESTED" = "1" ] && [ "$rc" -eq 0 ]; then
        sapds_log "stop was requested but the trainer finished the run (no REQUEUE marker)"
    fi
    if [ -f "$OUTPUT_DIR/summary.json" ] && [ "$rc" -eq 0 ]; then
        sapds_log "done: $OUTPUT_DIR/summary.json: $(cat "$OUTPUT_DIR/summary.json" | tr -d '\n' | cut -c1-400)"
    elif [ "$rc" -eq "$SAPDS_EXIT_STOPPED" ]; then
        sapds_log "stopped on request with a checkpoint (exit $rc) but no REQUEUE marker in $OUTPUT_DIR: not requeued;" \
            "submit the job again to resume"
    else
        sapds_log "trainer exited with status $rc (logs: $LOG_DIR)"
    fi
    exit "$rc"
}

# --------------------------------------------------------------------------- launchers
# One srun task per node; each runs torchrun with GPUS_PER_NODE workers. The trainer reads
# RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from torchrun.
# Variables: CONFIG, OUTPUT_DIR, GPUS_PER_NODE, EXTRA_ARGS (key=value overrides, spaces
# between them), TRAIN_SCRIPT (default: none, the module sap_ds.train of the environment's
# sap_ds; a path such as sap_ds/train.py runs that file), TORCHRUN (default "$PYTHON -m
# torch.distributed.run").
sapds_run_trainer() {
    export CONFIG GPUS_PER_NODE EXTRA_ARGS NNODES
    export TRAIN_SCRIPT="${TRAIN_SCRIPT:-}"
    export TORCHRUN="${TORCHRUN:-$PYTHON -m torch.distributed.run}"
    # Single quotes: SLURM_NODEID is per task, so it is expanded on each node.
    # shellcheck disable=SC2016
    local per_node='if [ -n "$TRAIN_SCRIPT" ]; then set -- "$TRAIN_SCRIPT"; else set -- -m sap_ds.train; fi
        exec $TORCHRUN --nnodes "$NNODES" --node_rank "$SLURM_NODEID" \
        --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$@" --config "$CONFIG" output_dir="$OUTPUT_DIR" $EXTRA_ARGS'
    sapds_log "launch: srun -N $NNODES --ntasks-per-node=1 torchrun --nproc_per_node $GPUS_PER_NODE ${TRAIN_SCRIPT:--m sap_ds.train} --config $CONFIG output_dir=$OUTPUT_DIR $EXTRA_ARGS"
    # --cpus-per-task: since Slurm 22.05 srun no longer inherits it from sbatch; without it
    # each node's torchrun and all its workers would be confined to one CPU.
    sapds_wait_bg srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        --cpus-per-task="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
        --output="$LOG_DIR/node%n-%N-restart${RESTART}.log" \
        bash -c "$per_node"
    sapds_finish "$SAPDS_RC"
}

# One task on the first node running "$@" (benchmarks, evaluation).
sapds_run_single() {
    sapds_log "launch: srun -N 1 -n 1 $*"
    sapds_wait_bg srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 \
        --cpus-per-task="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
        --output="$LOG_DIR/node%n-%N-restart${RESTART}.log" "$@"
    sapds_finish "$SAPDS_RC"
}
