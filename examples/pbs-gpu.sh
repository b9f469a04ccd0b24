#!/bin/bash
# Data-parallel training on several PBS Pro nodes with GPUs: one torchrun agent per node, one worker per
# GPU (nccl). Submit with: qsub -v DATA=/path examples/pbs-gpu.sh
# The restart path: a dead worker restarts every worker from the newest checkpoint, up to MAX_RESTARTS
# times (live membership is tested on the CPU only; examples/pbs.sh runs it there).
# At the walltime PBS sends SIGTERM, then SIGKILL after its kill_delay: training stops with a checkpoint
# if that leaves it time, and checkpoints every minute anyway (--checkpoint-every). A rerun job (-r y:
# a failed node, or `qrerun JOBID`) keeps its job id, so its RUN_DIR, and continues from there.
#PBS -N distvision-gpu
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=1
#PBS -l walltime=02:00:00
#PBS -r y
set -euo pipefail
cd "$PBS_O_WORKDIR"
DATA=${DATA:?usage: qsub -v DATA=/path/to/cifar10 pbs-gpu.sh}
NODES=$(sort -u "$PBS_NODEFILE")
NNODES=$(echo "$NODES" | wc -l)
HEAD=$(echo "$NODES" | head -n 1)
GPUS_PER_NODE=${GPUS_PER_NODE:-4}   # as ngpus in the select line above
MAX_RESTARTS=${MAX_RESTARTS:-3}     # torchrun's default is 0: no restart
# The run folder, on a file system every node shares (rank 0 writes it, every rank reads its checkpoints).
RUN_DIR=${RUN_DIR:-runs/pbs-$PBS_JOBID}
if [ -e "$RUN_DIR/summary.json" ]; then
  echo "pbs-gpu.sh: $RUN_DIR is finished"
  exit 0
fi
# --cache-dir on node-local disk: each node prepares its own memory-mapped copy once, under a lock.
ARGS="--data $DATA --model fastnet --out $RUN_DIR --cache-dir \${TMPDIR:-/tmp}/distvision-cache"
# A rerun job continues its run; --resume only when there is a checkpoint (a first start has none).
if compgen -G "$RUN_DIR/checkpoints/step-*" > /dev/null; then ARGS="$ARGS --resume"; fi

# One torchrun agent per node (pbsdsh runs the command once on each node of the job; it does not pass
# this script's environment on, so the command sets it). torch 2.13: the workers must not share
# torchrun's rendezvous store (see the README).
pbsdsh -u -- bash -lc "cd $PBS_O_WORKDIR && TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 .venv/bin/torchrun \
  --nnodes=$NNODES --nproc-per-node=$GPUS_PER_NODE --max-restarts=$MAX_RESTARTS \
  --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=$PBS_JOBID \
  -m distvision train --device cuda --recovery restart $ARGS"
