"""Exact faults in fp32, fp16, bf16 and int8: the numerical core of every trial.

A fault means: round the value to the number format, change bits of its stored representation
as the fault model says, convert back to the caller's dtype. The fault models
(:func:`fault_model`): ``bit_flip`` (one bit flipped, the transient fault of the paper),
``multi_bit:K`` (K adjacent bits flipped, from the trial's bit up: a particle strike that upsets
neighbouring cells), ``stuck_at_0`` and ``stuck_at_1`` (one bit forced: a no-op where it
already holds that value, and counted as such, never skipped).

Float formats change bits of the IEEE pattern through integer views, so the result is bit-exact
and vectorised (no Python loop over values). int8 models a symmetrically quantised tensor:
``q = clamp(round(v / scale), -128, 127)``, change bits of the two's-complement byte,
dequantise ``q' * scale``.

Bit 0 is always the least significant bit (the lowest mantissa bit for floats); the top bit is the
sign. When ``values`` already has the format's dtype a flip is its own inverse for every bit
pattern, NaN payloads included; across dtypes NaN payloads follow torch's conversions (NaN stays
NaN).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bitstorm.errors import ConfigError, DataError


@dataclass(frozen=True)
class NumberFormat:
    """A number format a fault can live in: its name, width in bits and torch storage types."""

    name: str
    width: int
    dtype: torch.dtype  # the dtype values are rounded to before the flip
    int_view: torch.dtype  # a signed integer dtype of the same width, for bit-level access

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


FORMATS: dict[str, NumberFormat] = {
    fmt.name: fmt
    for fmt in (
        NumberFormat("fp32", 32, torch.float32, torch.int32),
        NumberFormat("fp16", 16, torch.float16, torch.int16),
        NumberFormat("bf16", 16, torch.bfloat16, torch.int16),
        NumberFormat("int8", 8, torch.int8, torch.int8),
    )
}

# One XOR mask per bit position, in the format's own signed integer type. The sign bit's mask is
# the most negative value of that type (1 << (width - 1) does not fit), so it is listed explicitly.
_MASKS: dict[str, torch.Tensor] = {
    name: torch.tensor(
        [1 << b for b in range(fmt.width - 1)] + [-(1 << (fmt.width - 1))], dtype=fmt.int_view
    )
    for name, fmt in FORMATS.items()
}


@dataclass(frozen=True)
class FaultModel:
    """What a fault does to the stored word: ``op`` on ``width`` adjacent bits, from the
    trial's bit up (``xor``: flipped; ``clear``: stuck at 0; ``set``: stuck at 1)."""

    name: str
    op: str
    width: int = 1

    def bits(self, fmt: str) -> range:
        """The bits a trial of this fault model can start at in ``fmt``."""
        return range(format_width(fmt) - self.width + 1)

    @property
    def may_keep_word(self) -> bool:
        """Whether a fault can leave the stored word as it was: a stuck-at bit that already
        holds its value; a flip always changes the word."""
        return self.op != "xor"


BIT_FLIP = FaultModel("bit_flip", "xor")
FAULT_MODELS = ("bit_flip", "multi_bit:K", "stuck_at_0", "stuck_at_1")
MAX_ADJACENT = 8  # the widest multi_bit upset: bit K - 1 of the lowest word (int8) at most


@functools.cache
def fault_model(name: str) -> FaultModel:
    """A fault model by name: ``bit_flip``, ``multi_bit:K`` (K adjacent bits flipped, 2 to 8;
    ``multi_bit`` alone is 2), ``stuck_at_0`` or ``stuck_at_1``."""
    fixed = {
        "bit_flip": BIT_FLIP,
        "stuck_at_0": FaultModel("stuck_at_0", "clear"),
        "stuck_at_1": FaultModel("stuck_at_1", "set"),
    }
    if name in fixed:
        return fixed[name]
    base, _, count = str(name).partition(":")
    if base == "multi_bit" and (count or "2").isdigit():
        width = int(count or "2")
        if 2 <= width <= MAX_ADJACENT:
            return FaultModel(f"multi_bit:{width}", "xor", width)
    raise ConfigError(
        f"unknown fault model {name!r}; pass one of {', '.join(FAULT_MODELS)} "
        f"(K adjacent bits, 2 to {MAX_ADJACENT})"
    )


def number_format(fmt: str) -> NumberFormat:
    """Look a format up by name, with an error that lists the valid names."""
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown number format {fmt!r}; pass one of {', '.join(FORMATS)}"
        ) from None


def format_width(fmt: str) -> int:
    """Number of bit positions a fault in ``fmt`` can hit."""
    return number_format(fmt).width


def int8_scale(values: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
    """Symmetric int8 scale ``max|v| / 127``, per tensor or per channel along ``channel_dim``.

    The per-channel result keeps singleton dimensions so it broadcasts against ``values``. A scale
    of 0 (an all-zero tensor or channel) is legal: every value there quantises to 0 and dequantises
    to 0 whatever bit flips, which is what such hardware would compute.
    """
    _check_float(values)
    magnitude = values.detach().abs()
    if channel_dim is None:
        peak = magnitude.amax()
    else:
        dims = [d for d in range(values.ndim) if d != channel_dim % values.ndim]
        peak = magnitude.amax(dim=dims, keepdim=True) if dims else magnitude
    return (peak / 127).to(values.dtype)


def quantize(
    values: torch.Tensor, fmt: str, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """The values as the format stores them, converted back to ``values.dtype``.

    This is the "value before the flip" a trial records: the rounding to the format is part of the
    fault model, not of the fault.
    """
    number = _check_call(values, fmt, scale)
    if number.is_float:
        return values.to(number.dtype).to(values.dtype)
    scale_t = _check_scale(values, scale)
    return _dequantize(_to_int8(values, scale_t), scale_t, values.dtype)


def flip(
    values: torch.Tensor,
    bits: int | torch.Tensor,
    fmt: str,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Flip bit ``bits`` of every value as stored in ``fmt``: :func:`corrupt` with ``bit_flip``."""
    return corrupt(values, bits, fmt, scale)


def corrupt(
    values: torch.Tensor,
    bits: int | torch.Tensor,
    fmt: str,
    scale: torch.Tensor | float | None = None,
    fault: FaultModel = BIT_FLIP,
) -> torch.Tensor:
    """Apply ``fault`` at bit ``bits`` (its lowest bit) of every value as stored in ``fmt``;
    return the result in ``values.dtype``.

    ``bits`` is an int or an integer tensor broadcastable to ``values`` (one bit per value). For
    ``int8``, ``scale`` is required: a float, a 0-d tensor, or a per-channel tensor broadcastable
    to ``values`` (see :func:`int8_scale`). The input is never modified.
    """
    number = _check_call(values, fmt, scale)
    bit_index = _check_bits(bits, number, values, fault)
    mask = _fault_masks(number.name, fault.width).to(values.device)[bit_index]
    if number.is_float:
        stored = values.to(number.dtype).view(number.int_view)
        return _apply(stored, mask, fault.op).view(number.dtype).to(values.dtype)
    scale_t = _check_scale(values, scale)
    return _dequantize(_apply(_to_int8(values, scale_t), mask, fault.op), scale_t, values.dtype)


@functools.cache
def _fault_masks(fmt: str, width: int) -> torch.Tensor:
    """Per starting bit, the mask of ``width`` adjacent bits in ``fmt``'s signed integer type:
    OR of the one-bit masks (which spell the sign bit's as the type's most negative value)."""
    one_bit = _MASKS[fmt]
    starts = len(one_bit) - width + 1
    return torch.stack([one_bit[b : b + width].sum(dtype=one_bit.dtype) for b in range(starts)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Equal as stored, bit for bit (so NaN and -0.0 are never taken for another value)."""
    if a.dtype != b.dtype:
        return torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)
    if not a.dtype.is_floating_point:
        return a == b
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.view(view) == b.view(view)


def _apply(word: torch.Tensor, mask: torch.Tensor, op: str) -> torch.Tensor:
    if op == "xor":
        return word ^ mask
    if op == "clear":
        return word & ~mask
    return word | mask


def _to_int8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric quantisation; a zero scale maps its values to 0 instead of dividing by zero."""
    if not bool(torch.isfinite(values).all()):
        raise DataError(
            "int8 quantisation needs finite values; found NaN or Inf. "
            "Flip such values in a float format (fp32, fp16, bf16) instead"
        )
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(values / safe_scale).clamp(-128, 127)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return q.to(torch.int8)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) * scale).to(dtype)


def _check_float(values: object) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise DataError(
            f"values must be a floating-point torch.Tensor, got {got}; "
            "convert with torch.as_tensor(x, dtype=torch.float32)"
        )


def _check_call(values: torch.Tensor, fmt: str, scale: torch.Tensor | float | None) -> NumberFormat:
    _check_float(values)
    number = number_format(fmt)
    if number.is_float and scale is not None:
        raise ConfigError(
            f"scale is only used by int8; {fmt} flips the IEEE pattern directly, pass scale=None"
        )
    if not number.is_float and scale is None:
        raise ConfigError(
            "int8 needs a quantisation scale: pass scale=int8_scale(values) "
            "(per tensor) or int8_scale(values, channel_dim=0) (per channel)"
        )
    return number


def _check_scale(values: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    scale_t = torch.as_tensor(scale, dtype=values.dtype, device=values.device)
    if not bool(torch.isfinite(scale_t).all()) or bool((scale_t < 0).any()):
        raise ConfigError("int8 scale must be finite and >= 0; compute it with int8_scale(values)")
    try:
        torch.broadcast_shapes(scale_t.shape, values.shape)
    except RuntimeError:
        raise ConfigError(
            f"int8 scale of shape {tuple(scale_t.shape)} does not broadcast to values of shape "
            f"{tuple(values.shape)}; use int8_scale(values, channel_dim=...) for per-channel scales"
        ) from None
    return scale_t


def _check_bits(
    bits: int | torch.Tensor, number: NumberFormat, values: torch.Tensor, fault: FaultModel
) -> torch.Tensor:
    last = number.width - fault.width
    bad_range = f"bits must lie in 0..{last} for {number.name}" + (
        f" ({fault.name} changes bits b..b+{fault.width - 1})" if fault.width > 1 else ""
    )
    if isinstance(bits, torch.Tensor):
        if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
            raise ConfigError(f"bits must be an integer tensor, got {bits.dtype}")
        if bits.numel() and (int(bits.min()) < 0 or int(bits.max()) > last):
            raise ConfigError(
                f"{bad_range}; got values from {int(bits.min())} to {int(bits.max())}"
            )
        try:
            fits = torch.broadcast_shapes(bits.shape, values.shape) == values.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ConfigError(
                f"bits of shape {tuple(bits.shape)} must broadcast to values of shape "
                f"{tuple(values.shape)}: pass one bit per value or a single int"
            )
        return bits.to(device=values.device, dtype=torch.long)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(f"bits must be an int or an integer tensor, got {type(bits).__name__}")
    if not 0 <= bits <= last:
        raise ConfigError(f"{bad_range}; got {bits}")
    return torch.tensor(bits, device=values.device)
