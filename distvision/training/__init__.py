"""The parts of `distvision train` around its step loop (distvision/train.py), one concern each:

setup.py        device, data, model, tricks, optimizer, synchroniser: everything built once per run
state.py        TrainState: where the run is (epoch, cursor, step, seconds, history); checkpointed
batches.py      EpochBatches: the epoch's global batches from the cursor, this rank's share, prefetched
exchange.py     StepExchange: the small all-reduce of losses, votes, timings and shares, by name
checkpoints.py  CheckpointManager: when to save, resume, heartbeat, restart events, the run lock
faults.py       FaultInjector and StopSignal: every --debug-* behaviour, and SIGTERM's orderly stop
report.py       Reporter: epoch records, console lines, metrics.jsonl, summary.json, TensorBoard
"""
