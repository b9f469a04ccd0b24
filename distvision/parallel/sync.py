"""How replicas stay in step: what each mode exchanges, and how the exchange is applied.

"allreduce": synchronous data parallelism, gradients averaged every step by DistributedDataParallel
  (the Pattern Parallel Training of Dahl et al. 2008 with the weight changes combined every step),
  optionally compressed by a DDP communication hook (fp16, bf16, PowerSGD).
"local-sgd": each replica takes K optimizer steps on its own slices, then the replicas' parameters
  and buffers are averaged (torch's model-averaging utility). K = "epoch" is Dahl's one exchange per
  pass over each worker's share. The first `warmup` steps all-reduce gradients (post-local SGD).
"diloco": local steps like local SGD, then an outer Nesterov step on the replicas' average change
  (Douillard et al. 2023); live membership only. With --fragments F, Streaming DiLoCo: one fragment of
  the model a round, each fragment every H steps (fragments.py).

Under live membership PowerSGD runs torch's own hook on the round's flat gradients (low_rank.py).

On a fixed process group (torchrun, the restart path) gradients travel inside DDP's backward and
local SGD averages through torch's model-averaging utility. Under live membership the replica is a
group of one: the round's payload (gradients, parameters or DiLoCo's pseudo-gradients, and the
batch-norm statistics) goes into the round's one exchange (training/exchange.py, through the
membership), and `apply` uses the sum once the round is committed.

Time blocked in collectives (communicating, or waiting for a slower peer) and the bytes each worker
puts into them are counted in SyncStats, so the cost of each mode is measured, not guessed.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel

from distvision.config import SYNC_MODES, ParallelSettings, TrainConfig, steps_per_round, steps_this_round
from distvision.errors import UserError
from distvision.parallel.fragments import OuterFragments
from distvision.parallel.low_rank import LowRankGradients
from distvision.parallel.membership import (
    Rollback,
    flatten,
    statistics_buffers,
    trainable,
    unflatten_into,
)
from distvision.parallel.quantize import QUANTIZE_BITS, ErrorFeedback, Quantized, dequantize

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
HALF_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}  # --compress: the gradients' wire dtype
# The small all-reduce of losses and votes is a collective round-trip of its own, a noticeable share
# of a short step on the CPU (figures in benchmarks/RESULTS.md). So it runs every few steps: about
# once a STATS_SECONDS, so that a stop request (which has STOP_GRACE_SECONDS to reach a checkpoint)
# or a diverged replica is still seen soon, and at most STATS_EVERY steps apart.
STATS_SECONDS = 1.0
STATS_EVERY = 16
# Under local SGD the replicas run free between averagings, and each exchange is a point where they
# wait for each other, so it runs less often; still often enough that a stop request is seen well
# within STOP_GRACE_SECONDS (training/faults.py) when 16 steps take longer than that (fastnet or resnet18
# on a CPU).
LOCAL_SGD_STATS_SECONDS = 5.0


def stats_interval(seconds_per_step: float, target_seconds: float = STATS_SECONDS) -> int:
    """Steps between the exchanges of losses and votes, about target_seconds apart for steps this long."""
    return int(min(STATS_EVERY, max(1, target_seconds // max(seconds_per_step, 1e-9))))


@dataclass
class SyncStats:
    """This worker's communication since the last reset: blocked seconds and payload bytes."""

    communication_seconds: float = 0.0
    bytes_exchanged: int = 0

    @contextmanager
    def timed(self, payload_bytes: int):
        """Count the time inside the block, and the payload, as communication."""
        started = time.perf_counter()
        yield
        self.communication_seconds += time.perf_counter() - started
        self.bytes_exchanged += payload_bytes


_FLAG_DEFAULTS = ParallelSettings()  # the flags' defaults: TrainConfig is their one source


@dataclass
class SyncSettings:
    """The synchronisation flags of a run (TrainConfig's ParallelSettings holds them and their checks)."""

    mode: str = _FLAG_DEFAULTS.sync
    every: str = _FLAG_DEFAULTS.period  # local-sgd: steps between averagings, or "epoch"
    warmup: int = _FLAG_DEFAULTS.sync_warmup
    compress: str = _FLAG_DEFAULTS.compress
    powersgd_rank: int = _FLAG_DEFAULTS.powersgd_rank
    outer_lr: float = _FLAG_DEFAULTS.outer_lr
    outer_momentum: float = _FLAG_DEFAULTS.outer_momentum
    quantize: str = _FLAG_DEFAULTS.quantize  # local-sgd, diloco (live): the changes' wire codes
    fragments: int = _FLAG_DEFAULTS.fragments  # diloco: the model's fragments, one synchronised a round
    overlap: int = _FLAG_DEFAULTS.overlap  # diloco: inner steps a round's exchange is in flight for
    overlap_mix: float = _FLAG_DEFAULTS.overlap_mix  # the local weights' share after an overlapped round

    @classmethod
    def from_config(cls, config: TrainConfig) -> SyncSettings:
        return cls(config.sync, config.period, config.sync_warmup, config.compress, config.powersgd_rank,
                   config.outer_lr, config.outer_momentum, config.quantize, config.fragments, config.overlap,
                   config.overlap_mix)


@dataclass
class Wire:
    """The tensors a round's packed vector travels as: `summed` in place over the participants, and
    `gathered`, every participant's copy to every participant (the quantized codes, which would
    overflow if summed). Synchronizer.unwire puts the result back into the packed vector."""

    summed: list[torch.Tensor]
    gathered: list[torch.Tensor] = field(default_factory=list)
    quantized: Quantized | None = None  # this replica's codes of the round's change
    # Collectives of their own on the round's group, each started by a function of the group that returns
    # a future (PowerSGD's hook, which all-reduces P, then Q); the bytes they hand in.
    on_group: list[Callable] = field(default_factory=list)
    on_group_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """The bytes this worker hands to the collectives."""
        return sum(t.numel() * t.element_size() for t in [*self.summed, *self.gathered]) + self.on_group_bytes


class Synchronizer:
    """Wraps one replica; train.py calls backward(), then after_step(), then exchanges_stats() (and
    pace_stats() after each exchange), reads stats, and may set work_while_exchanging."""

    def __init__(self, model: nn.Module, settings: SyncSettings, device: torch.device, live: bool = False,
                 outer: torch.optim.Optimizer | None = None, fragments: OuterFragments | None = None):
        if settings.mode not in SYNC_MODES:
            raise UserError(f"unknown synchronisation mode {settings.mode!r}; choose from {', '.join(SYNC_MODES)}")
        self.settings = settings
        self.stats = SyncStats()
        # Work for the training thread while a gradient exchange is in flight (loading the next batch):
        # gloo exchanges in its own thread, and this thread would only wait for it.
        self.work_while_exchanging: Callable[[], None] | None = None
        self.live = live  # a replica of a live job: the exchange goes through the membership, not DDP
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1 and not live
        self.model = model
        self.round_steps = 1  # steps in the round under way, which begin_round decides at its start
        self.round_averages_gradients = True  # live: the round under way exchanges gradients
        # The payload's leading values, before the batch-norm statistics: one per trainable parameter.
        self.parameter_count = sum(p.numel() for p in trainable(model))
        self.outer = outer  # DiLoCo's outer optimizer (outer_optimizer), resumed before the wrapping
        self.fragments = fragments  # DiLoCo's agreed weights (outer_fragments), resumed with it
        self.round_tensors = range(0)  # DiLoCo: the parameter tensors the round now ending sends
        self.launched = False  # --overlap: the round's payload is in flight, its steps go on
        # --quantize: this replica's error feedback on the changes it sends (live local SGD and DiLoCo).
        bits = QUANTIZE_BITS.get(settings.quantize)
        self.feedback = ErrorFeedback(self.parameter_count, bits) if bits and live else None
        # --compress powersgd, live: torch's hook over the round's flat gradients (on a fixed group, DDP's)
        self.low_rank = (LowRankGradients([p.shape for p in trainable(model)], settings.powersgd_rank)
                         if live and settings.compress == "powersgd" else None)
        if self.distributed:
            device_ids = [device.index] if device.type == "cuda" else None
            # Under local SGD, DDP must not broadcast rank 0's buffers at every forward: that would be a
            # hidden exchange (and a wait) per step. The buffers are averaged with the parameters instead.
            sync_buffers = settings.mode == "allreduce"
            # torch 2.13 renamed the option (broadcast_buffers is deprecated there); older torch has the old name.
            buffers_option = ("forward_sync_buffers" if "forward_sync_buffers" in
                              inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
            self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                 **{buffers_option: sync_buffers})
            self._register_hook(device)
        self._since_average = 0
        self.stats_every = 1  # steps between exchanges of losses and votes, until paced

    # -- gradients -------------------------------------------------------------------------------------
    def averages_gradients(self, step: int) -> bool:
        return self.settings.mode == "allreduce" or step < self.settings.warmup

    def begin_round(self, step: int, steps_left: int) -> None:
        """A round starts at this step, `steps_left` steps before the epoch's end: it lasts one step when
        averaging gradients, else the period's share of the epoch's rest (steps_this_round). On the
        restart path a round may end at an exchange of votes between averagings: the period, fixed at
        its averaging, runs on."""
        self.round_averages_gradients = self.averages_gradients(step)
        if self.live or self._since_average == 0:
            self.round_steps = steps_this_round(steps_left, self._longest_round(step, steps_left))
        self.launched = False

    def _longest_round(self, step: int, steps_left: int) -> int:
        """The most steps a round starting at this step may take: one averaging gradients, the epoch's rest
        under --sync-every epoch, else K (Streaming DiLoCo: H/F, each fragment every H, one a round)."""
        if self.averages_gradients(step):
            return 1
        if self.settings.every == "epoch":
            return steps_left
        return steps_per_round(self.settings.every, self.fragments.count if self.fragments else 1)

    def launches_now(self, steps_in_round: int, samples_left: int, batch_size: int) -> bool:
        """--overlap T: the round's exchange starts now, T steps before its end, unless the epoch's end
        would cut the round short (that round sends every fragment, at its end)."""
        overlap = self.settings.overlap
        return (self.live and overlap > 0 and not self.round_averages_gradients and not self.launched
                and steps_in_round == self.round_steps - overlap and samples_left > overlap * batch_size)

    def backward(self, loss_sum: torch.Tensor, local_count: int, global_count: int, world_size: int,
                 step: int) -> None:
        """Backward of a summed loss, scaled so that the update is the mean over the right samples."""
        if self.averages_gradients(step):
            # DDP averages over ranks; world/len(global batch) makes that the mean over the global
            # batch even when ranks hold unequal slices. Live, the participants' gradients are summed.
            (loss_sum * ((world_size if self.distributed else 1) / global_count)).backward()
            return
        (loss_sum / local_count).backward()  # a local step: this replica's own mean gradient

    def steps_now(self, step: int) -> bool:
        """Whether the optimizer steps right after backward; live gradient averaging steps once the
        round is committed (apply)."""
        return not (self.live and self.averages_gradients(step))

    # -- parameters ------------------------------------------------------------------------------------
    def after_step(self, step: int, last_of_epoch: bool) -> bool:
        """Average the replicas when local SGD's period is over; True when the replicas are identical now.
        Live, they are identical once the round's exchange is applied."""
        if self.live:
            return False
        if self.averages_gradients(step) or not self.distributed:
            return True
        self._since_average += 1
        every = self.settings.every
        due = last_of_epoch or (every != "epoch" and self._since_average >= self.round_steps)
        if due:
            self.average_replicas()
        return due

    def exchanges_stats(self, steps_since: int, in_sync: bool, last_of_epoch: bool) -> bool:
        """Whether the small all-reduce of losses and votes runs after this step, `steps_since` steps
        (this one included) after the last one.

        It runs every `stats_every` steps (paced by pace_stats), under local SGD also at every
        averaging, and always at the end of an epoch.
        """
        if self.live:
            return last_of_epoch or steps_since >= self.round_steps
        if not self.distributed:
            return True
        if self.settings.mode == "local-sgd" and in_sync:
            return True
        return last_of_epoch or steps_since >= self.stats_every

    def pace_stats(self, seconds_per_step: float) -> None:
        """Space the exchanges of losses and votes for steps this long (rank 0's wall time per step
        since the last exchange, the same number on every rank: every rank keeps the same pace)."""
        local = self.settings.mode == "local-sgd"
        self.stats_every = stats_interval(seconds_per_step, LOCAL_SGD_STATS_SECONDS if local else STATS_SECONDS)

    def average_replicas(self) -> None:
        replica = unwrap(self.model)
        parameters = [p for p in replica.parameters()]
        buffers = [b for b in replica.buffers() if b.is_floating_point()]  # batch-norm statistics
        payload = sum(t.numel() * t.element_size() for t in parameters + buffers)
        with self.stats.timed(payload):
            average_parameters(iter(parameters), None)
            if buffers:
                average_parameters(iter(buffers), None)
        self._since_average = 0

    # -- live: the round's payload and its committed sum -----------------------------------------------------
    def round_payload(self, before: Rollback | None, room: int, ends_epoch: bool = False) -> torch.Tensor | None:
        """Live: what this replica adds to the round's exchange, as one float32 vector with `room` values
        left for the exchange's votes: the gradients (one step), the parameters (local SGD) or the change
        since the agreed weights (DiLoCo's pseudo-gradient; Streaming DiLoCo's, of the round's fragment, or
        of all of them at an epoch's end), then the batch-norm statistics, averaged too so that every
        replica evaluates and decides alike. One copy: gradients kept as views of the exchanged vector
        made fastnet's steps 12% slower here (benchmarks/RESULTS.md, 2026-12-03)."""
        if not self.live:
            return None
        if self.launched:  # sent already (--overlap): the round's end exchanges only the votes
            return torch.zeros(room)
        replica = unwrap(self.model)
        parameters, buffers = trainable(replica), statistics_buffers(replica)
        if self.round_averages_gradients:
            gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
            return flatten([*gradients, *buffers], room)
        if self.settings.mode == "diloco":
            self.round_tensors = self.fragments.this_round(ends_epoch)
            return flatten([*self.fragments.changes(self.round_tensors), *buffers], room)
        if self.feedback:  # quantized local SGD sends the change too: the average is the start plus its mean
            changes = [p.detach() - original for p, original in zip(parameters, before.weights, strict=True)]
            return flatten([*changes, *buffers], room)
        return flatten([*parameters, *buffers], room)

    def wire(self, packed: torch.Tensor) -> Wire:
        """Live: the tensors the round's packed vector travels as. With --compress fp16 or bf16 a round
        that averages gradients sends them in half precision (as DDP's fp16 and bf16 hooks do on a fixed
        group); with --quantize a round of local steps sends its change as codes with error feedback,
        gathered. The rest, batch-norm statistics and the exchange's votes, counts and fingerprints,
        goes in float32, exactly. `unwire` puts the sums back into `packed`."""
        count = self.payload_values
        if self.launched:
            return Wire([packed])  # the votes after a payload sent early
        if self.quantizes_round:
            start = self.fragments.offset(self.round_tensors) if self.fragments else 0
            quantized = self.feedback.encode(packed[:count], start)
            return Wire([packed[count:]], [quantized.codes, quantized.scales], quantized)
        if self.low_rank is not None and self.round_averages_gradients:
            self.low_rank.begin()
            gradients = packed[:count]
            return Wire([packed[count:]], on_group=[lambda group: self.low_rank.reduce(gradients, group)],
                        on_group_bytes=self.low_rank.bytes_this_round())
        dtype = HALF_PRECISION.get(self.settings.compress)
        if not (self.live and dtype is not None and self.round_averages_gradients):
            return Wire([packed])
        return Wire(half_precision_wire(packed, count, dtype))

    def unwire(self, wire: Wire, packed: torch.Tensor, gathered: list[list[torch.Tensor]]) -> None:
        """The round's sums back into `packed`, in its precision: a half-precision copy's, or the sum of
        every participant's decoded change (`gathered`: each gathered tensor's copies, one per participant;
        a participant that sent nothing sent zero scales)."""
        if wire.quantized is not None:
            mine = wire.quantized
            codes, scales = gathered
            total = torch.zeros(mine.count, dtype=torch.float32)
            for their_codes, their_scales in zip(codes, scales, strict=True):
                total += dequantize(Quantized(their_codes, their_scales, mine.count, mine.bits))
            packed[: mine.count].copy_(total)
        elif wire.on_group:  # PowerSGD's hook leaves the participants' average in place: a sum, as the rest
            packed[: self.parameter_count].mul_(self.low_rank.group_size)
        else:
            restore_half_precision(wire.summed, packed)

    @property
    def payload_values(self) -> int:
        """Live: the round's payload values before the statistics: one per trainable parameter, or under
        DiLoCo one per value of the tensors the round sends."""
        if self.settings.mode == "diloco" and not self.round_averages_gradients:
            return self.fragments.values(self.round_tensors)
        return self.parameter_count

    @property
    def quantizes_round(self) -> bool:
        """The round under way sends its change as codes (--quantize, live, a round of local steps)."""
        return self.feedback is not None and not self.round_averages_gradients

    def weights_moved(self) -> None:
        """After a commit the weights changed alike on every replica (the lookahead's pull): they are the
        agreed weights DiLoCo's next change is measured from (only one fragment runs with a lookahead)."""
        if self.fragments:
            self.fragments.take_agreed(range(len(self.fragments.parameters)))

    def agreed_tensors(self) -> list[torch.Tensor]:
        """What every replica holds alike at a round's start, compared at quorums: the whole replica,
        or under DiLoCo the agreed weights (with fragments, each runs free between its rounds; with
        --overlap, a round ends on a mix with each replica's own steps) and the statistics (averaged
        every round)."""
        replica = unwrap(self.model)
        if self.fragments:
            return [*self.fragments.agreed(), *replica.buffers()]
        return [*replica.parameters(), *replica.buffers()]

    def settle(self) -> None:
        """A DiLoCo run ending between synchronisations takes the agreed weights, the same on every
        replica (a no-op right after a round that mixed nothing, such as an epoch's end, which sends
        every fragment and is not overlapped)."""
        if self.fragments:
            self.fragments.settle()

    def healed(self) -> None:
        """This replica took a peer's weights: the changes its error feedback still owed are not its own."""
        if self.feedback:
            self.feedback.reset()
        if self.low_rank:
            self.low_rank.healed()

    def apply(self, summed: torch.Tensor, participants: int, before: Rollback,
              optimizer: torch.optim.Optimizer) -> None:
        """Live, a committed round: an optimizer step on the summed gradients, the participants' average
        (local SGD), or an outer Nesterov step on the average change (DiLoCo); buffers averaged."""
        replica = unwrap(self.model)
        parameters, buffers = trainable(replica), statistics_buffers(replica)
        count = self.payload_values
        unflatten_into(summed[count:] / participants, buffers, as_grad=False)
        if self.quantizes_round:
            self.feedback.commit()  # the round counts: what its codes left out is owed to the next one
        if self.round_averages_gradients:
            if self.low_rank:
                self.low_rank.commit()  # the round counts: so does the state PowerSGD's hook left
            unflatten_into(summed[:count], parameters, as_grad=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif self.settings.mode == "diloco":  # the outer step from the agreed weights, on the round's tensors
            sent = self.round_tensors
            local = [parameters[index].detach().clone() for index in sent] if self.launched else []
            self.fragments.rewind(sent)
            unflatten_into(summed[:count] / participants, parameters[sent.start : sent.stop], as_grad=True)
            self.outer.step()  # a tensor without a gradient (another fragment's) is left as it is
            self.outer.zero_grad(set_to_none=True)
            self.fragments.committed(sent)
            if self.launched:  # overlapped: mixed with where the steps in flight took this replica
                with torch.no_grad():
                    for parameter, reached in zip(parameters[sent.start : sent.stop], local, strict=True):
                        parameter.lerp_(reached, self.settings.overlap_mix)
        elif self.feedback:  # local SGD's average: where the round began, plus the mean change
            unflatten_into(flatten(before.weights) + summed[:count] / participants, parameters, as_grad=False)
        else:
            unflatten_into(summed[:count] / participants, parameters, as_grad=False)

    # -- communication hooks ---------------------------------------------------------------------------
    def _register_hook(self, device: torch.device) -> None:
        """A hook that runs the chosen (compressed) all-reduce, blocking, timed and counted."""
        compress = self.settings.compress
        if compress not in COMPRESSIONS:
            raise UserError(f"unknown --compress {compress!r}; choose from {', '.join(COMPRESSIONS)}")
        if compress == "bf16":
            _check_bf16_collectives(device)
        stats, rank = self.stats, self.settings.powersgd_rank

        def counted_allreduce(state, bucket):
            """torch's all-reduce hook, counting the bytes really handed to the collective (after any
            cast a compression wrapper made)."""
            buffer = bucket.buffer()
            stats.bytes_exchanged += buffer.numel() * buffer.element_size()
            return default_hooks.allreduce_hook(state, bucket)

        if compress == "powersgd":
            inner_state = powerSGD_hook.PowerSGDState(process_group=None,
                                                      matrix_approximation_rank=self.settings.powersgd_rank,
                                                      start_powerSGD_iter=2, use_error_feedback=True,
                                                      warm_start=True)
            inner = powerSGD_hook.powerSGD_hook
        else:
            inner_state = None
            # fp16_compress_hook is fp16_compress_wrapper(allreduce_hook) (torch's docs): the same
            # arithmetic, with the count taken where the compressed buffer meets the collective.
            inner = {"none": counted_allreduce, "fp16": default_hooks.fp16_compress_wrapper(counted_allreduce),
                     "bf16": default_hooks.bf16_compress_wrapper(counted_allreduce)}[compress]

        def hook(_state, bucket):
            # PowerSGD's collectives happen inside torch's hook: its bytes are computed from the shapes
            # of the P and Q matrices it sends (_powersgd_payload_bytes).
            with stats.timed(_powersgd_payload_bytes(bucket, rank) if compress == "powersgd" else 0):
                in_flight = inner(inner_state, bucket)
            if self.work_while_exchanging:
                self.work_while_exchanging()
            with stats.timed(0):
                reduced = in_flight.wait()
            done = torch.futures.Future()
            done.set_result(reduced)
            return done

        self.model.register_comm_hook(None, hook)

    def step_context(self, step: int):
        """Around forward and backward: DDP decides in forward whether backward exchanges gradients."""
        if self.distributed and not self.averages_gradients(step):
            return self.model.no_sync()
        return nullcontext()


def half_precision_wire(packed: torch.Tensor, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The first `count` values of `packed` as a copy in `dtype`, and the rest as a view of `packed`
    (summed in place); unwire() copies the first part's sums back."""
    return [packed[:count].to(dtype), packed[count:]]


def restore_half_precision(summed: list[torch.Tensor], packed: torch.Tensor) -> None:
    """The sums of a half-precision wire back into `packed`, in its precision (a no-op for one tensor:
    it was `packed`)."""
    if len(summed) > 1:
        packed[: summed[0].numel()].copy_(summed[0])


def outer_optimizer(model: nn.Module, settings: SyncSettings) -> torch.optim.Optimizer | None:
    """DiLoCo's outer Nesterov SGD over the replica's trainable parameters (None for the other modes)."""
    if settings.mode != "diloco":
        return None
    momentum = settings.outer_momentum
    return torch.optim.SGD(trainable(model), lr=settings.outer_lr, momentum=momentum, nesterov=momentum > 0)


def outer_fragments(model: nn.Module, settings: SyncSettings) -> OuterFragments | None:
    """DiLoCo's agreed weights in --fragments fragments (None for the other modes)."""
    if settings.mode != "diloco":
        return None
    parameters = trainable(model)
    if settings.fragments > len(parameters):
        raise UserError(f"--fragments {settings.fragments} is more than this model's {len(parameters)} parameter "
                        "tensors; a fragment holds at least one")
    return OuterFragments(parameters, settings.fragments)


def _powersgd_payload_bytes(bucket, rank: int) -> int:
    """Bytes this worker contributes to one bucket's PowerSGD reduction: P and Q of each matrix (or the
    matrix, where that is smaller), and the vectors uncompressed."""
    total = 0
    for gradient in bucket.gradients():
        if gradient.ndim <= 1:
            total += gradient.numel() * 4
            continue
        rows = gradient.shape[0]
        cols = gradient.numel() // rows
        total += min((rows + cols) * rank, rows * cols) * 4
    return total


def _check_bf16_collectives(device: torch.device) -> None:
    """bf16 all-reduce has failed on gloo (pytorch#111131): try it before training, fail clearly."""
    probe = torch.ones(8, dtype=torch.bfloat16, device=device)
    try:
        dist.all_reduce(probe)
        ok = bool(torch.all(probe == dist.get_world_size()))
    except RuntimeError as error:
        raise UserError(f"--compress bf16 cannot run on the {dist.get_backend()} backend here ({error}); "
                        "use --compress fp16") from None
    if not ok:
        raise UserError(f"--compress bf16 gives wrong sums on the {dist.get_backend()} backend here; "
                        "use --compress fp16")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain replica inside any wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
