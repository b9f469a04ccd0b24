"""Communication-bound scaling measured for real: two workers in Linux network namespaces joined by a
veth pair whose bandwidth `tc tbf` limits, compared with `distvision scale`'s model.

    sudo python benchmarks/netns_scale.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --report /tmp/scale-caffe-quick --rates unlimited,1gbit,100mbit --fraction 0.1 --out /tmp/netns-scale
    sudo python benchmarks/netns_scale.py ... --rates unlimited,1gbit,100mbit,10mbit \
        --modes allreduce,live:allreduce,live:diloco:32,live:diloco:32:int4,live:diloco:32:int4:f4:o2

--report is a `distvision scale` report folder of the same model (its model.json supplies the fitted
terms; without it nothing is predicted). Each rate and mode is one real 2-worker run over the veth
addresses only. `allreduce` (the restart path): two torchrun agents, one per namespace, c10d
rendezvous and gloo. `live:MODE` (live membership, torchft): a Lighthouse in the first namespace,
bound to its veth address, and one `distvision train --lighthouse ... --bind ADDRESS` replica per
namespace (torchft's servers and gloo advertise and listen on that address); MODE is allreduce,
local-sgd:K or diloco:K, either of those two with :int8 or :int4 (--quantize), diloco also with :fN
(--fragments N, Streaming DiLoCo) and :oT (--overlap T). Latency (`--latency`) needs the kernel's netem qdisc; where it is
missing (as on the machine this was written on) only the bandwidth is limited and that is said.
Needs root and iproute2; otherwise it prints why and exits 0. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from sync_modes import mode_flags as sync_mode_flags  # the benchmark beside this one

from distvision.scale.model import PerformanceModel, Point, syncs_per_epoch
from distvision.scale.network import Network, parse_network

REPO = Path(__file__).resolve().parents[1]  # the workers run this checkout

SUBNET = "10.77.{}.{}"
PORT = 29517
LIGHTHOUSE_PORT = 29518


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


class VethPair:
    """Two namespaces, one veth pair between them, addresses 10.77.K.1 and 10.77.K.2; removed on exit."""

    def __init__(self):
        tag = os.getpid() % 200 + 20
        self.namespaces = [f"dvscale{tag}a", f"dvscale{tag}b"]
        self.devices = [f"dvs{tag}a", f"dvs{tag}b"]
        self.addresses = [SUBNET.format(tag, 1), SUBNET.format(tag, 2)]

    def __enter__(self) -> Self:
        for namespace in self.namespaces:
            sh("ip", "netns", "add", namespace)
        sh("ip", "link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1])
        for namespace, device, address in zip(self.namespaces, self.devices, self.addresses, strict=True):
            sh("ip", "link", "set", device, "netns", namespace)
            sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            sh("ip", "-n", namespace, "link", "set", device, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for namespace in self.namespaces:
            sh("ip", "netns", "del", namespace, check=False)

    def limit(self, rate: str, latency: str | None) -> str:
        """Shape both directions; returns what was applied, in words."""
        applied = []
        for namespace, device in zip(self.namespaces, self.devices, strict=True):
            sh("ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root", check=False)
            if rate == "unlimited":
                continue
            bytes_per_second = 1 / parse_network(rate).seconds_per_byte
            burst = max(64_000, int(bytes_per_second / 100))  # at least one 10 ms tick's worth
            sh("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "handle", "1:",
               "tbf", "rate", rate, "burst", str(burst), "latency", "100ms")
            applied.append(f"tbf {rate}")
            if latency:
                delay = sh("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "parent", "1:1",
                           "handle", "10:", "netem", "delay", latency, check=False)
                applied.append(f"netem {latency}" if delay.returncode == 0 else "no netem in this kernel")
        return ", ".join(sorted(set(applied))) or "no limit"


def mode_flags(mode: str) -> tuple[bool, list[str]]:
    """(live, train flags) of a --modes entry: a sync_modes.py mode (allreduce, local-sgd:K[:int8|int4],
    diloco:K[:int8|int4][:fN], ...), with `live:` before it for live membership."""
    return mode.startswith("live:"), sync_mode_flags(mode.removeprefix("live:"))


def run_pair(pair: VethPair, train_args: list[str], out: Path, live: bool = False) -> float:
    """One 2-worker training run, one worker per namespace; returns its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    agents, lighthouse = [], None
    if live:
        lighthouse_address = f"{pair.addresses[0]}:{LIGHTHOUSE_PORT}"
        # Both replicas in the first quorum (min_replicas 2), so the run is measured from the start.
        lighthouse = subprocess.Popen(["ip", "netns", "exec", pair.namespaces[0],
                                       str(Path(sys.executable).parent / "torchft_lighthouse"), "--min_replicas", "2",
                                       "--bind", lighthouse_address, "--join_timeout_ms", "5000"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        secret = out.parent / f"{out.name}.secret"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
    started = time.perf_counter()
    for index, (namespace, device, address) in enumerate(zip(pair.namespaces, pair.devices, pair.addresses,
                                                             strict=True)):
        environment = ["env", f"GLOO_SOCKET_IFNAME={device}", f"PYTHONPATH={REPO}"]
        if live:  # each replica's servers on its own veth address, the one it advertises
            command = [*environment, sys.executable, "-m", "distvision", "train", *train_args, "--out", str(out),
                       "--lighthouse", lighthouse_address, "--bind", address, "--secret-file", str(secret)]
        else:
            # The store's host is named explicitly: torch recognises its own address by host name, and
            # the namespaces share the machine's.
            command = [*environment, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                       "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={pair.addresses[0]}:{PORT}",
                       f"--rdzv-id=netns-{out.name}", f"--rdzv-conf=is_host={'true' if index == 0 else 'false'}",
                       f"--local-addr={address}", "--max-restarts=0",
                       "-m", "distvision", "train", *train_args, "--out", str(out), "--recovery", "restart"]
        log = open(out.parent / f"{out.name}-{namespace}.log", "w")  # noqa: SIM115 - closed with the agent
        agents.append((subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdout=log,
                                        stderr=subprocess.STDOUT), log))
    try:
        codes = [agent.wait(timeout=3600) for agent, _ in agents]
    finally:
        if lighthouse:
            lighthouse.kill()
            lighthouse.wait()
    for _, log in agents:
        log.close()
    if any(codes):
        raise SystemExit(f"a run failed (exit codes {codes}); see {out.parent}/{out.name}-*.log")
    return time.perf_counter() - started


def load_model(report: Path) -> PerformanceModel:
    saved = json.loads((report / "model.json").read_text())
    network = Network(saved["network"]["latency_seconds"], saved["network"]["seconds_per_byte"],
                      saved["network"]["name"])
    return PerformanceModel(saved["terms"], saved["uncertainty"], network, saved["fitted"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="caffe-quick")
    parser.add_argument("--report", type=Path, help="a distvision scale report of the same model (predictions "
                        "of the allreduce runs)")
    parser.add_argument("--rates", default="unlimited,1gbit,100mbit")
    parser.add_argument("--modes", default="allreduce", help="allreduce (restart path), live:allreduce, "
                        "live:local-sgd:K[:int8|int4], live:diloco:K[:int8|int4][:fN][:oT]")
    parser.add_argument("--latency", help="added delay per direction, e.g. 1ms (needs netem)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/netns-scale"))
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("netns_scale: skipped: needs root and iproute2 (ip, tc) to build network namespaces")
        return
    model = load_model(args.report) if args.report else None
    train_args = ["--data", args.data, "--model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size),
                  "--train-fraction", str(args.fraction), "--threads-per-worker", "1", "--precision", "fp32",
                  "--max-restarts", "0", "--image-size", str(args.image_size)]
    rows = []
    with VethPair() as pair:
        for rate in args.rates.split(","):
            shaping = pair.limit(rate, args.latency)
            for mode in args.modes.split(","):
                live, flags = mode_flags(mode)
                out = args.out / f"{rate}-{mode.replace(':', '-')}"
                wall = run_pair(pair, [*train_args, *flags], out, live)
                record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if '"event"' not in line][-1]
                summary = json.loads((out / "summary.json").read_text())
                measured = record["epoch_seconds"] + record["eval_seconds"]
                row = {"rate": rate, "mode": mode, "shaping": shaping, "wall_seconds": round(wall, 1),
                       "measured_epoch_seconds": round(measured, 2), "test_accuracy": summary["test_accuracy"],
                       "communication_seconds": record["communication_seconds"],
                       "megabytes_per_worker": round(sum(record["bytes_exchanged"]) / 2e6, 2)}
                if model:  # the bytes per synchronisation measured, the rest from the scale report's terms
                    sync, every = (flags[1], flags[3]) if flags[:1] == ["--sync"] else ("allreduce", "1")
                    if "--fragments" in flags:  # a synchronisation every H/F steps (scale's spec diloco:fN)
                        sync += f":f{flags[flags.index('--fragments') + 1]}"
                    syncs = syncs_per_epoch(summary["train_count"], args.batch_size, sync, every, 2)
                    payload = sum(record["bytes_exchanged"]) / 2 / syncs
                    point = Point(2, summary["train_count"], args.batch_size, sync, every, payload)
                    shaped = rate + (f",{args.latency}" if args.latency else "")
                    predicted = model.epoch_seconds(point, None if rate == "unlimited" else parse_network(shaped))
                    row.update(predicted_epoch_seconds=round(predicted, 2),
                               relative_error=round(abs(predicted - measured) / measured, 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "netns_scale.json").write_text(json.dumps(rows, indent=2))
    print("| link | mode | shaping | measured s/epoch | MB per worker | predicted s/epoch | error |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        error = f"{row['relative_error']:.1%}" if "relative_error" in row else "-"
        print(f"| {row['rate']} | {row['mode']} | {row['shaping']} | {row['measured_epoch_seconds']} | "
              f"{row['megabytes_per_worker']} | {row.get('predicted_epoch_seconds', '-')} | {error} |")


if __name__ == "__main__":
    main()
