#!/usr/bin/env bash
# The wall time and the CPU time of a command's whole process tree (forkservers, workers, Lighthouse
# included, which `time` misses: their parent is not the command), through a cgroup v1 cpuacct group.
# Needs root. Usage: benchmarks/cpu_time.sh LABEL COMMAND [ARGS...]; the command's output goes to
# /tmp/cpu_time.last.
set -euo pipefail
label=$1
shift
group=/sys/fs/cgroup/cpuacct/distvision-cpu-time
mkdir -p "$group"
echo 0 > "$group/cpuacct.usage"
start=$(date +%s.%N)
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$group" "$@" > /tmp/cpu_time.last 2>&1
end=$(date +%s.%N)
python3 -c "print(f'$label: wall {$end - $start:.2f} s, cpu {$(cat "$group/cpuacct.usage") / 1e9:.2f} s')"
