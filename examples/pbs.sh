#!/bin/bash
# Data-parallel training on several PBS Pro / Torque nodes (CPU). Submit with: qsub -v DATA=/path examples/pbs.sh
# RECOVERY=restart (default): one torchrun job over all nodes; a dead worker restarts every worker from
# the newest checkpoint, up to MAX_RESTARTS times.
# RECOVERY=live (qsub -v DATA=/path,RECOVERY=live): one replica per node around a torchft Lighthouse
# on the first node, so a node that dies leaves and the others train on; the nodes share a secret
# file, and belong on a trusted cluster network (see examples/slurm.sbatch).
# At the walltime PBS sends SIGTERM, then SIGKILL after its kill_delay: training stops with a checkpoint
# if that leaves it time, and checkpoints every minute anyway (--checkpoint-every). A rerun job (-r y:
# a failed node, or `qrerun JOBID`) keeps its job id, so its RUN_DIR, and continues from there.
# GPUs: examples/pbs-gpu.sh.
#PBS -N distvision
#PBS -l select=4:ncpus=32:mpiprocs=1
#PBS -l walltime=02:00:00
#PBS -r y
set -euo pipefail
cd "$PBS_O_WORKDIR"
DATA=${DATA:?usage: qsub -v DATA=/path/to/cifar10 pbs.sh}
RECOVERY=${RECOVERY:-restart}
NODES=$(sort -u "$PBS_NODEFILE")
NNODES=$(echo "$NODES" | wc -l)
HEAD=$(echo "$NODES" | head -n 1)
WORKERS_PER_NODE=${WORKERS_PER_NODE:-2}
MAX_RESTARTS=${MAX_RESTARTS:-3}   # torchrun restarts a dead (restart) or hung (live) worker; its default is 0
# The run folder, on a file system every node shares (rank 0 writes it, every rank reads its checkpoints).
RUN_DIR=${RUN_DIR:-runs/pbs-$PBS_JOBID}
if [ -e "$RUN_DIR/summary.json" ]; then
  echo "pbs.sh: $RUN_DIR is finished"
  exit 0
fi
COMMON="--data $DATA --model fastnet --out $RUN_DIR --cache-dir \${TMPDIR:-/tmp}/distvision-cache"
# A rerun job continues its run; --resume only when there is a checkpoint (a first start has none).
if compgen -G "$RUN_DIR/checkpoints/step-*" > /dev/null; then COMMON="$COMMON --resume"; fi
# pbsdsh does not pass this script's environment on, so each node's command sets it. torch 2.13: the
# workers must not share torchrun's rendezvous store (see the README).
NODE_ENV="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"

# One torchrun agent per node (pbsdsh runs the command once on each node of the job).
case "$RECOVERY" in
  live)
    # The first node's cluster address: the Lighthouse listens there only (set HEAD_ADDR if the name
    # resolves to another network). The job's secret: made once, mode 600, in a home every node sees.
    HEAD_ADDR=${HEAD_ADDR:-$(getent ahostsv4 "$HEAD" | awk 'NR == 1 {print $1}')}
    : "${HEAD_ADDR:?cannot resolve $HEAD; set HEAD_ADDR to its cluster address}"
    SECRET_FILE=${SECRET_FILE:-$HOME/.distvision/secret-$PBS_JOBID}
    if [ ! -e "$SECRET_FILE" ]; then
      mkdir -p -m 700 "$(dirname "$SECRET_FILE")"
      (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_hex(32))' > "$SECRET_FILE")
    fi
    # Supervised: the replicas rejoin a restarted Lighthouse within --lighthouse-grace (60 s).
    (until .venv/bin/torchft_lighthouse --min_replicas 1 --bind "$HEAD_ADDR:29510" --heartbeat_timeout_ms 1000 --join_timeout_ms 5000; do
       sleep 1; done) &
    pbsdsh -u -- bash -lc "cd $PBS_O_WORKDIR && $NODE_ENV .venv/bin/torchrun --standalone --nproc-per-node=1 --max-restarts=$MAX_RESTARTS \
      -m distvision train --recovery live --lighthouse $HEAD_ADDR:29510 --secret-file $SECRET_FILE \
      --threads-per-worker $NCPUS $COMMON"
    ;;
  restart)
    pbsdsh -u -- bash -lc "cd $PBS_O_WORKDIR && $NODE_ENV .venv/bin/torchrun \
      --nnodes=$NNODES --nproc-per-node=$WORKERS_PER_NODE --max-restarts=$MAX_RESTARTS \
      --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=$PBS_JOBID \
      -m distvision train --recovery restart $COMMON"
    ;;
  *)
    echo "pbs.sh: RECOVERY must be live or restart, not '$RECOVERY'" >&2
    exit 2
    ;;
esac
