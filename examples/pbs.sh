#!/bin/bash
# Data-parallel training on several PBS Pro / Torque nodes. Submit with: qsub -v DATA=/path examples/pbs.sh
# RECOVERY=live (qsub -v DATA=/path,RECOVERY=live): one replica per node around a torchft Lighthouse
# on the first node, so a node that dies leaves and the others train on (see examples/slurm.sbatch).
#PBS -N distvision
#PBS -l select=4:ncpus=32:mpiprocs=1
#PBS -l walltime=02:00:00
set -euo pipefail
cd "$PBS_O_WORKDIR"
NODES=$(sort -u "$PBS_NODEFILE")
NNODES=$(echo "$NODES" | wc -l)
HEAD=$(echo "$NODES" | head -n 1)
WORKERS_PER_NODE=${WORKERS_PER_NODE:-2}
COMMON="--data $DATA --model fastnet --out runs/pbs-$PBS_JOBID --cache-dir \${TMPDIR:-/tmp}/distvision-cache"

# One torchrun agent per node (pbsdsh runs the command once on each node of the job).
if [ "${RECOVERY:-restart}" = live ]; then
  .venv/bin/torchft_lighthouse --min_replicas 1 --bind "[::]:29510" --heartbeat_timeout_ms 1000 &
  pbsdsh -u -- bash -lc "cd $PBS_O_WORKDIR && .venv/bin/torchrun --standalone --nproc-per-node=1 \
    -m distvision train --recovery live --lighthouse $HEAD:29510 --threads-per-worker $NCPUS $COMMON"
else
  pbsdsh -u -- bash -lc "cd $PBS_O_WORKDIR && .venv/bin/torchrun \
    --nnodes=$NNODES --nproc-per-node=$WORKERS_PER_NODE \
    --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=$PBS_JOBID \
    -m distvision train $COMMON"
fi
