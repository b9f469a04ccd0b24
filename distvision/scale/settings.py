"""`distvision scale` settings, and the comma-separated lists its flags take."""

from __future__ import annotations

from dataclasses import dataclass, field

from distvision.errors import UserError


@dataclass
class ScaleConfig:
    data: str | None
    model: str = "caffe-quick"
    out: str = "runs/scale"
    workers: list[int] = field(default_factory=lambda: [1, 2])
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    batch_sizes: list[int] = field(default_factory=lambda: [512])
    syncs: list[str] = field(default_factory=lambda: ["allreduce"])
    sync_every: str = "8"  # local SGD's period, for measured and predicted local-SGD points
    epochs: int = 1
    repeats: int = 1
    threads_per_worker: int = 1  # the same for every worker at every worker count: one node's cores
    predict_workers: list[int] = field(default_factory=lambda: [4, 8, 16, 64])
    network: str | None = None  # e.g. "10gbit,50us"; None: the network measured here
    precision: str = "fp32"
    image_size: int = 32
    seed: int = 0
    cache_dir: str | None = None
    train_args: list[str] = field(default_factory=list)  # further `distvision train` flags, passed on


def parse_list(text: str, kind: type, flag: str, minimum: float | None = None, maximum: float | None = None) -> list:
    """'1,2,4' -> [1, 2, 4]; anything malformed or out of range is a one-line UserError."""
    items = [item.strip() for item in str(text).split(",")]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise UserError(f"{flag} takes a comma-separated list of {kind.__name__}s, e.g. "
                        f"{'1,2,4' if kind is int else '0.25,0.5,1'} (got {text!r})") from None
    for value in values:
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise UserError(f"{flag}: {value} is out of range [{minimum}, {maximum}] (got {text!r})")
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice (got {text!r})")
    return values


def parse_syncs(text: str, sync_every: str | None = None) -> list[str]:
    """--sync of scale and bench: modes, local-sgd and diloco also as MODE:int8 or MODE:int4 (--quantize),
    diloco also with :fN and :oT (Streaming DiLoCo's --fragments N and --overlap T, checked against
    `sync_every`)."""
    from distvision.config import SYNC_MODES, check_fragments, check_overlap, split_sync

    syncs = [item.strip() for item in text.split(",")]
    for spec in syncs:
        fields = split_sync(spec)
        mode, quantize, fragments, overlap = fields["sync"], fields["quantize"], fields["fragments"], fields["overlap"]
        if mode not in SYNC_MODES or quantize not in ("none", "int8", "int4") or (
                quantize != "none" and mode == "allreduce") or fragments < 1 or (
                (fragments > 1 or overlap) and mode != "diloco"):
            raise UserError(f"--sync: unknown mode {spec!r}; choose from {', '.join(SYNC_MODES)}, local-sgd "
                            "and diloco also as MODE:int8 or MODE:int4 (their changes quantized), diloco also "
                            "with :fN and :oT (N fragments, an exchange overlapping T steps, e.g. "
                            "diloco:int4:f4:o2)")
        if fragments > 1:
            check_fragments(mode, sync_every, fragments)
        if overlap:
            check_overlap(mode, sync_every, fragments, overlap, 0.5)
    return syncs


def validate(config: ScaleConfig) -> None:
    """Settings that cannot work, refused before any run starts."""
    from distvision.config import check_sync_every
    from distvision.models.registry import get_entry
    from distvision.scale.network import parse_network

    get_entry(config.model)
    if config.network:
        parse_network(config.network)
    if config.epochs < 1 or config.repeats < 1 or config.threads_per_worker < 1:
        raise UserError("--epochs, --repeats and --threads-per-worker must be at least 1")
    check_sync_every(config.sync_every)
    if 1 not in config.workers:
        raise UserError("--workers must include 1: speedups are measured against one worker")
    if min(config.batch_sizes) < max(config.workers):
        raise UserError(f"--batch-sizes {min(config.batch_sizes)} is smaller than --workers {max(config.workers)}")
