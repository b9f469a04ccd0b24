"""Quantized exchange on the CPU (--quantize int8|int4): the parameter changes a round of local SGD or
DiLoCo sends, as signed integers with one float32 scale per block of values, and error feedback.

torchft's quantized collectives need CUDA (they import triton), so a CPU cluster gets none of them;
this is the same idea in plain tensor operations. A block's scale is its largest magnitude over the
largest code, codes round to nearest, and int4 codes go two to a byte. Sums of codes from different
replicas would overflow, so the codes are gathered, not summed: every replica decodes each peer's
values and adds them up itself (parallel/live.py's all-gather).

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what rounding left out of this replica's
last sent change is added to its next one, so over many rounds nothing is lost, only delayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZE_BITS = {"int8": 8, "int4": 4}
BLOCK = 128  # values per scale: 4 bytes per 128 values, about 3% on top of int8 and 6% on top of int4


def largest_code(bits: int) -> int:
    """The largest magnitude a signed code of this width holds symmetrically (127, 7)."""
    return 2 ** (bits - 1) - 1


@dataclass
class Quantized:
    """A vector as codes (uint8, offset by the largest code; int4 two to a byte) and per-block scales."""

    codes: torch.Tensor
    scales: torch.Tensor
    count: int  # values encoded
    bits: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def code_bytes(count: int, bits: int) -> int:
    """Bytes of the codes of `count` values."""
    return -(-count * bits // 8)


def scale_count(count: int, block: int = BLOCK) -> int:
    return -(-count // block)


def quantize(values: torch.Tensor, bits: int, block: int = BLOCK) -> Quantized:
    """Encode a float vector: per block, scale = max |value| / largest code, code = round(value / scale)."""
    top = largest_code(bits)
    count = values.numel()
    padded = torch.zeros(scale_count(count, block) * block, dtype=torch.float32)
    padded[:count] = values.reshape(-1).float()
    blocks = padded.view(-1, block)
    scales = blocks.abs().amax(dim=1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (torch.round(blocks / safe[:, None]).clamp_(-top, top) + top).to(torch.uint8).view(-1)[:count]
    if bits == 4:
        if count % 2:
            codes = torch.cat([codes, torch.full((1,), top, dtype=torch.uint8)])  # a zero, padding the last byte
        codes = codes[0::2] | (codes[1::2] << 4)
    return Quantized(codes.contiguous(), scales, count, bits)


def dequantize(quantized: Quantized, block: int = BLOCK) -> torch.Tensor:
    """The float32 values a Quantized stands for."""
    top = largest_code(quantized.bits)
    codes = quantized.codes
    if quantized.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).view(-1)
    values = codes[: quantized.count].float() - top
    padded = torch.zeros(quantized.scales.numel() * block, dtype=torch.float32)
    padded[: quantized.count] = values
    return (padded.view(-1, block) * quantized.scales[:, None]).view(-1)[: quantized.count]


class ErrorFeedback:
    """This replica's residual: what quantizing its sent changes has left out so far.

    encode() adds the residual to a change and keeps the new residual as pending; only a committed
    round makes it the residual (commit()), so a discarded round, redone from its rollback, leaves the
    residual as it was. A replica that heals from a peer starts from none (reset()): it takes the peer's
    weights, and the changes its residual was owed belong to weights it no longer has.
    """

    def __init__(self, count: int, bits: int, block: int = BLOCK):
        self.bits, self.block = bits, block
        self.residual = torch.zeros(count, dtype=torch.float32)
        self.pending: tuple[int, torch.Tensor] | None = None  # (start, what this round's codes left out)

    def encode(self, change: torch.Tensor, start: int = 0) -> Quantized:
        """The codes of a change to the values from `start` on (Streaming DiLoCo sends a fragment a
        round: each fragment's residual is its own part of the vector)."""
        change = change.reshape(-1).float()
        corrected = change + self.residual[start : start + change.numel()]
        quantized = quantize(corrected, self.bits, self.block)
        self.pending = (start, corrected - dequantize(quantized, self.block))
        return quantized

    def commit(self) -> None:
        if self.pending is not None:
            start, left_out = self.pending
            self.residual[start : start + left_out.numel()] = left_out
            self.pending = None

    def discard(self) -> None:
        self.pending = None

    def reset(self) -> None:
        self.residual.zero_()
        self.pending = None
