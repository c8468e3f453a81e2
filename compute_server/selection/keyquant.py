"""Low-bit keys for chunk identification (KIVI-style per-channel quantisation; pure torch, no I/O).

Keys ``[kv_heads, n, d]`` are cut into groups of ``group`` tokens. Per group, KV head and channel
one float16 pair (min, step) is kept, step = (max - min) / (2^bits - 1), and every value becomes
``round((k - min) / step)`` in ``bits`` bits, packed ``8 // bits`` tokens to a byte (the earliest
token in the lowest bits). Channels are quantised separately because post-RoPE keys have a few
large-magnitude channels: a per-token scale would spend all levels on them.

Byte format of one layer (the ``qkeys`` record): float16 ``[G, kv_heads, 2, d]`` (min, step), then
uint8 ``[G, kv_heads, group * bits // 8, d]`` codes; ``G = ceil(n / group)``; tokens past ``n`` in
the last group repeat the last real key and are dropped on decode.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def _check(bits: int, group: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    per_byte = 8 // bits
    if group < 1 or group % per_byte:
        raise ValueError(f"group must be a positive multiple of {per_byte} for {bits}-bit codes, got {group}")
    return per_byte


def quantized_bytes(num_tokens: int, kv_heads: int, head_dim: int, bits: int, group: int) -> int:
    """Size of :func:`quantize_keys`' output."""
    _check(bits, group)
    groups = -(-num_tokens // group)
    return groups * kv_heads * head_dim * (4 + group * bits // 8)


def quantize_keys(keys: torch.Tensor, bits: int, group: int, fit: str = "minmax") -> torch.Tensor:
    """Keys ``[kv_heads, n, d]`` (any float dtype) -> the packed record, flat uint8 on the CPU.

    ``fit``: ``minmax`` puts the lowest and highest level on the group's min and max; ``lloyd``
    fits (min, step) by least squares to the values' codes and re-codes, a few rounds (Lloyd's
    algorithm restricted to evenly spaced levels): at 1 bit the two levels become the means of the
    values on either side instead of the extremes, which roughly halves the error on bell-shaped
    channels. The decoder is the same for both.
    """
    per_byte = _check(bits, group)
    kv_heads, n, d = keys.shape
    if n < 1:
        raise ValueError("no keys to quantise")
    groups = -(-n // group)
    k = keys.detach().to("cpu", torch.float32)
    if groups * group > n:  # pad by repeating the last key: it leaves min and max unchanged
        k = torch.cat([k, k[:, -1:].expand(kv_heads, groups * group - n, d)], dim=1)
    k = k.view(kv_heads, groups, group, d).transpose(0, 1)  # [G, kv_heads, group, d]
    if fit not in ("minmax", "lloyd"):
        raise ValueError(f"fit must be minmax or lloyd, got {fit!r}")
    levels = (1 << bits) - 1
    lo = k.amin(dim=2).to(torch.float16)  # [G, kv_heads, d]
    step = ((k.amax(dim=2) - lo.float()) / levels).to(torch.float16)
    codes = _codes(k, lo, step, levels)
    first = (lo, step, codes)
    for _ in range(4 if fit == "lloyd" else 0):
        c = codes.float()  # least squares of k on its codes, per group, head and channel
        cm, km = c.mean(dim=2, keepdim=True), k.mean(dim=2, keepdim=True)
        var = ((c - cm) ** 2).sum(dim=2)
        slope = torch.where(var > 0, ((c - cm) * (k - km)).sum(dim=2) / var.clamp_min(1e-12), torch.zeros_like(var))
        slope = slope.clamp_min(0)
        lo = (km[:, :, 0] - slope * cm[:, :, 0]).to(torch.float16)
        step = slope.to(torch.float16)
        codes = _codes(k, lo, step, levels)
    if fit == "lloyd":  # keep min/max levels wherever they were better after all (tiny groups, float16 rounding)
        real = (torch.arange(groups * group) < n).view(groups, 1, group, 1)  # padding does not count
        worse = _error(k, lo, step, codes, real) > _error(k, *first, real)
        lo, step = torch.where(worse, first[0], lo), torch.where(worse, first[1], step)
        codes = torch.where(worse[:, :, None], first[2], codes)
    codes = codes.view(groups, kv_heads, group // per_byte, per_byte, d)
    packed = torch.zeros(groups, kv_heads, group // per_byte, d, dtype=torch.uint8)
    for i in range(per_byte):
        packed |= codes[:, :, :, i] << (i * bits)
    scales = torch.stack([lo, step], dim=2)  # [G, kv_heads, 2, d]
    return torch.cat([scales.contiguous().view(torch.uint8).reshape(-1), packed.reshape(-1)])


def _codes(k: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest level of every value [G, kv_heads, group, d] given float16 (lo, step) [G, kv_heads, d]."""
    safe = torch.where(step.float() > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    return torch.round((k - lo.float()[:, :, None]) / safe[:, :, None]).clamp_(0, levels).to(torch.uint8)


def _error(k: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, codes: torch.Tensor,
           real: torch.Tensor) -> torch.Tensor:
    """Squared error over the ``real`` tokens, per group, KV head and channel [G, kv_heads, d], of
    ``codes`` under (lo, step)."""
    back = lo.float()[:, :, None] + codes.float() * step.float()[:, :, None]
    return (((back - k) ** 2) * real).sum(dim=2)


def dequantized_shape(num_tokens: int, kv_heads: int, head_dim: int, group: int) -> tuple[int, int, int]:
    """Shape of the buffer :func:`dequantize_keys` decodes into: whole groups, ``[kv_heads, G * group, d]``."""
    return kv_heads, -(-num_tokens // group) * group, head_dim


DECODED_DTYPES = (torch.float32, torch.bfloat16)


class PackedKeys:
    """A packed record parsed in place (no copy): per group, KV head and channel the (min, step)
    pair, and the codes; decoded a slice of groups at a time by :meth:`decode` (the scorers decode
    one cache-sized tile of one KV head, score it and reuse the tile: the layer's keys are never
    written out whole). ``record``: flat uint8 on any device; decoding runs there."""

    def __init__(self, record: torch.Tensor, num_tokens: int, kv_heads: int, head_dim: int, bits: int,
                 group: int) -> None:
        self.per_byte = _check(bits, group)
        expected = quantized_bytes(num_tokens, kv_heads, head_dim, bits, group)
        if record.dtype != torch.uint8 or record.numel() != expected:
            raise ValueError(f"qkeys record: expected {expected} uint8 bytes, got {record.numel()} {record.dtype}")
        self.num_tokens, self.kv_heads, self.head_dim, self.bits, self.group = num_tokens, kv_heads, head_dim, bits, group
        self.num_groups = groups = -(-num_tokens // group)
        split = groups * kv_heads * 2 * head_dim * 2
        # [kvH, G, 2, d] float16 (min, step), and the codes [kvH, G, group / per_byte, d]
        self.scales = record[:split].view(torch.float16).view(groups, kv_heads, 2, head_dim).transpose(0, 1)
        self.packed = record[split:].view(groups, kv_heads, group // self.per_byte, head_dim).transpose(0, 1)
        # each byte's slots, lowest first: shifted out in one broadcast op, [per_byte, 1]
        self._shifts = (torch.arange(self.per_byte, dtype=torch.uint8, device=record.device) * bits).view(-1, 1)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def decode(self, out: torch.Tensor, heads: slice, first: int, stop: int) -> torch.Tensor:
        """Groups ``[first, stop)`` of KV heads ``heads`` into ``out``: contiguous float32 or bfloat16
        ``[len(heads), (stop - first) * group, d]`` (whole groups: the last one's padding too). The
        codes are unpacked straight into ``out`` in token order and scaled in place; in bfloat16
        ``lo + code * step`` is rounded once more, far below the quantisation's own error."""
        packed, scales = self.packed[heads, first:stop], self.scales[heads, first:stop]
        h, g, d = packed.shape[0], stop - first, self.head_dim
        if tuple(out.shape) != (h, g * self.group, d) or out.dtype not in DECODED_DTYPES or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 or bfloat16 {(h, g * self.group, d)} tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        codes = out.view(h, g, self.group // self.per_byte, self.per_byte, d)  # token t of a group: byte t // pb, slot t % pb
        # every slot at once, in the output's order: a quarter of the ops of a shift per slot, and
        # the conversion to float a contiguous copy (the decode took 25 % less time than per slot)
        codes.copy_(torch.bitwise_right_shift(packed.unsqueeze(3), self._shifts).bitwise_and_((1 << self.bits) - 1))
        keys = out.view(h, g, self.group, d)
        scales = scales.to(out.dtype)
        torch.addcmul(scales[:, :, 0:1], keys, scales[:, :, 1:2], out=keys)  # lo + code * step, as encoded, one pass
        return out


def dequantize_keys(record: torch.Tensor, num_tokens: int, kv_heads: int, head_dim: int, bits: int,
                    group: int, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A packed record (flat uint8, on any device) -> keys ``[kv_heads, n, d]`` of ``dtype`` (float32
    or bfloat16) on that device (:meth:`PackedKeys.decode` of every group).

    ``out``: a buffer of :func:`dequantized_shape` on the record's device to decode into (its
    dtype is the one decoded to; its first ``n`` tokens are returned, a view); reusing one saves
    the page faults of a fresh ``[kv_heads, n, d]`` tensor per layer, which cost more than the
    decoding itself on a CPU (docs/performance.md).
    """
    keys = PackedKeys(record, num_tokens, kv_heads, head_dim, bits, group)
    shape = dequantized_shape(num_tokens, kv_heads, head_dim, group)
    if out is None:
        if dtype not in DECODED_DTYPES:
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        out = torch.empty(shape, dtype=dtype, device=record.device)
    elif tuple(out.shape) != shape or out.dtype not in DECODED_DTYPES or out.device != record.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 or bfloat16 {shape} tensor on {record.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return keys.decode(out, slice(None), 0, keys.num_groups)[:, :num_tokens]
