"""Communication-bound scaling measured for real: two workers in Linux network namespaces joined by a
veth pair whose bandwidth `tc tbf` limits, compared with `distvision scale`'s model.

    sudo python benchmarks/netns_scale.py --data ../shared/datasets/cifar10-jpg --model caffe-quick \
        --report /tmp/scale-caffe-quick --rates unlimited,1gbit,100mbit --fraction 0.1 --out /tmp/netns-scale

--report is a `distvision scale` report folder of the same model (its model.json supplies the fitted
terms). Each rate is one real 2-worker run: two torchrun agents, one per namespace, c10d rendezvous and
gloo over the veth addresses only. Latency (`--latency`) needs the kernel's netem qdisc; where it is
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

from distvision.scale.model import PerformanceModel, Point
from distvision.scale.network import Network, parse_network

REPO = Path(__file__).resolve().parents[1]  # the workers run this checkout

SUBNET = "10.77.{}.{}"
PORT = 29517


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


def run_pair(pair: VethPair, train_args: list[str], out: Path) -> float:
    """One 2-worker training run, one torchrun agent per namespace; returns its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    agents = []
    started = time.perf_counter()
    for index, (namespace, device, address) in enumerate(zip(pair.namespaces, pair.devices, pair.addresses,
                                                             strict=True)):
        # The store's host is named explicitly: torch recognises its own address by host name, and
        # the namespaces share the machine's.
        command = ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={device}",
                   f"PYTHONPATH={REPO}", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={pair.addresses[0]}:{PORT}",
                   f"--rdzv-id=netns-{out.name}", f"--rdzv-conf=is_host={'true' if index == 0 else 'false'}",
                   f"--local-addr={address}", "--max-restarts=0",
                   "-m", "distvision", "train", *train_args, "--out", str(out)]
        log = open(out.parent / f"{out.name}-{namespace}.log", "w")  # noqa: SIM115 - closed with the agent
        agents.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
    codes = [agent.wait(timeout=3600) for agent, _ in agents]
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
    parser.add_argument("--report", required=True, type=Path, help="a distvision scale report of the same model")
    parser.add_argument("--rates", default="unlimited,1gbit,100mbit")
    parser.add_argument("--latency", help="added delay per direction, e.g. 1ms (needs netem)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/netns-scale"))
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("netns_scale: skipped: needs root and iproute2 (ip, tc) to build network namespaces")
        return
    model = load_model(args.report)
    train_args = ["--data", args.data, "--model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size),
                  "--train-fraction", str(args.fraction), "--threads-per-worker", "1", "--precision", "fp32",
                  "--max-restarts", "0", "--image-size", str(args.image_size)]
    rows = []
    with VethPair() as pair:
        for rate in args.rates.split(","):
            shaping = pair.limit(rate, args.latency)
            wall = run_pair(pair, train_args, args.out / rate)
            record = [json.loads(line) for line in (args.out / rate / "metrics.jsonl").read_text().splitlines()][-1]
            summary = json.loads((args.out / rate / "summary.json").read_text())
            measured = record["epoch_seconds"] + record["eval_seconds"]
            steps = summary["stop_step"]
            payload = sum(record["bytes_exchanged"]) / 2 / steps
            point = Point(2, summary["train_count"], args.batch_size, "allreduce", "8", payload)
            shaped = rate + (f",{args.latency}" if args.latency else "")
            network = None if rate == "unlimited" else parse_network(shaped)
            predicted = model.epoch_seconds(point, network)
            rows.append({"rate": rate, "shaping": shaping, "wall_seconds": round(wall, 1),
                         "measured_epoch_seconds": round(measured, 2), "predicted_epoch_seconds": round(predicted, 2),
                         "relative_error": round(abs(predicted - measured) / measured, 3),
                         "communication_seconds": record["communication_seconds"],
                         "megabytes_per_worker": round(sum(record["bytes_exchanged"]) / 2e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "netns_scale.json").write_text(json.dumps(rows, indent=2))
    print("| link | shaping | measured s/epoch | predicted s/epoch | error |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rate']} | {row['shaping']} | {row['measured_epoch_seconds']} | "
              f"{row['predicted_epoch_seconds']} | {row['relative_error']:.1%} |")


if __name__ == "__main__":
    main()
