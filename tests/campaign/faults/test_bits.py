"""bits.flip and the other fault models against independent references: numpy integer views and
Python's struct module."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstorm.errors import BitstormError, ConfigError, DataError
from campaign.faults.bits import (
    FORMATS,
    corrupt,
    fault_model,
    flip,
    format_width,
    int8_scale,
    quantize,
    same_bits,
)

N_RANDOM = 100_000
RNG_SEED = 20231210

# Edge patterns per format, as raw bits: +-0, smallest/largest subnormal, smallest/largest normal,
# one, +-inf, quiet NaN, signalling NaN, negative NaN with a payload.
SPECIAL_BITS = {
    "fp32": [
        0x00000000,
        0x80000000,
        0x00000001,
        0x007FFFFF,
        0x00800000,
        0x7F7FFFFF,
        0xFF7FFFFF,
        0x3F800000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFC12345,
    ],
    "fp16": [
        0x0000,
        0x8000,
        0x0001,
        0x03FF,
        0x0400,
        0x7BFF,
        0xFBFF,
        0x3C00,
        0x7C00,
        0xFC00,
        0x7E00,
        0x7C01,
        0xFE5A,
    ],
    "bf16": [
        0x0000,
        0x8000,
        0x0001,
        0x007F,
        0x0080,
        0x7F7F,
        0xFF7F,
        0x3F80,
        0x7F80,
        0xFF80,
        0x7FC0,
        0x7F81,
        0xFFA5,
    ],
}
UNSIGNED = {"fp32": np.uint32, "fp16": np.uint16, "bf16": np.uint16}


def _patterns(fmt: str, rng: np.random.Generator) -> np.ndarray:
    """Uniform random bit patterns (which hit NaN, Inf and subnormals) plus every edge case."""
    width = FORMATS[fmt].width
    random = rng.integers(0, 2**width, size=N_RANDOM, dtype=np.uint64).astype(UNSIGNED[fmt])
    return np.concatenate([np.array(SPECIAL_BITS[fmt], dtype=UNSIGNED[fmt]), random])


def _tensor_from_bits(patterns: np.ndarray, fmt: str) -> torch.Tensor:
    signed = patterns.view(np.int32 if fmt == "fp32" else np.int16)
    return torch.from_numpy(signed.copy()).view(FORMATS[fmt].dtype)


def _bits_of(values: torch.Tensor, fmt: str) -> np.ndarray:
    return values.view(FORMATS[fmt].int_view).numpy().view(UNSIGNED[fmt])


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_float_flip_is_bit_exact_on_every_pattern_and_bit(fmt):
    rng = np.random.default_rng(RNG_SEED)
    patterns = _patterns(fmt, rng)
    width = FORMATS[fmt].width
    bits = rng.integers(0, width, size=patterns.size)
    expected = patterns ^ (np.ones_like(patterns) << bits.astype(patterns.dtype))
    result = flip(_tensor_from_bits(patterns, fmt), torch.from_numpy(bits), fmt)
    np.testing.assert_array_equal(_bits_of(result, fmt), expected)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_every_bit_of_every_edge_value(fmt):
    width = FORMATS[fmt].width
    patterns = np.array(SPECIAL_BITS[fmt], dtype=UNSIGNED[fmt])
    values = _tensor_from_bits(patterns, fmt)
    for bit in range(width):
        expected = patterns ^ UNSIGNED[fmt](1 << bit)
        np.testing.assert_array_equal(_bits_of(flip(values, bit, fmt), fmt), expected)


def test_fp32_matches_struct_packing():
    rng = np.random.default_rng(RNG_SEED + 1)
    values = rng.standard_normal(200).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 200)
    for value, bit in zip(values.tolist(), rng.integers(0, 32, 200).tolist(), strict=True):
        (raw,) = struct.unpack("<I", struct.pack("<f", value))
        (expected,) = struct.unpack("<f", struct.pack("<I", raw ^ (1 << bit)))
        got = flip(torch.tensor([value], dtype=torch.float32), bit, "fp32").item()
        assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_fp16_format_on_fp32_values_rounds_like_numpy():
    rng = np.random.default_rng(RNG_SEED + 2)
    values = (rng.standard_normal(N_RANDOM) * 10.0 ** rng.integers(-8, 6, N_RANDOM)).astype(
        np.float32
    )
    values[:4] = [0.0, -0.0, 70000.0, 1e-8]  # overflow to inf and underflow to 0 in fp16
    bits = rng.integers(0, 16, N_RANDOM)
    with np.errstate(over="ignore"):  # 70000 overflows to inf on purpose
        half = values.astype(np.float16).view(np.uint16)
    expected = (half ^ (np.ones_like(half) << bits.astype(np.uint16))).view(np.float16)
    got = flip(torch.from_numpy(values), torch.from_numpy(bits), "fp16")
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


def _bf16_round_reference(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even from fp32 to bf16 on the integer pattern (finite inputs)."""
    raw = values.view(np.uint32).astype(np.uint64)
    rounded = (raw + 0x7FFF + ((raw >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def test_bf16_format_on_fp32_values_rounds_to_nearest_even():
    rng = np.random.default_rng(RNG_SEED + 3)
    values = (rng.standard_normal(N_RANDOM) * 10.0 ** rng.integers(-30, 30, N_RANDOM)).astype(
        np.float32
    )
    bits = rng.integers(0, 16, N_RANDOM)
    flipped = _bf16_round_reference(values) ^ (
        np.ones(N_RANDOM, np.uint16) << bits.astype(np.uint16)
    )
    expected = (flipped.astype(np.uint32) << 16).view(np.float32)
    got = flip(torch.from_numpy(values), torch.from_numpy(bits), "bf16")
    np.testing.assert_array_equal(got.numpy(), expected)


def _int8_reference(values: np.ndarray, bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(values / scale), -128, 127).astype(np.int8)
    flipped = q.view(np.uint8) ^ (np.ones_like(q, dtype=np.uint8) << bits.astype(np.uint8))
    return flipped.view(np.int8).astype(np.float32) * scale


def test_int8_per_tensor_matches_numpy():
    rng = np.random.default_rng(RNG_SEED + 4)
    values = rng.standard_normal(N_RANDOM).astype(np.float32) * 3
    bits = rng.integers(0, 8, N_RANDOM)
    tensor = torch.from_numpy(values)
    scale = int8_scale(tensor)
    assert scale.item() == pytest.approx(np.abs(values).max() / 127, rel=1e-6)
    expected = _int8_reference(values, bits, np.float32(scale.item()))
    got = flip(tensor, torch.from_numpy(bits), "int8", scale)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_int8_per_channel_scale_and_extremes():
    rng = np.random.default_rng(RNG_SEED + 5)
    weights = rng.standard_normal((64, 3, 3, 3)).astype(np.float32) * rng.uniform(
        0.01, 5, (64, 1, 1, 1)
    ).astype(np.float32)
    tensor = torch.from_numpy(weights)
    scale = int8_scale(tensor, channel_dim=0)
    assert scale.shape == (64, 1, 1, 1)
    bits = rng.integers(0, 8, weights.shape)
    expected = _int8_reference(weights, bits, scale.numpy())
    np.testing.assert_array_equal(
        flip(tensor, torch.from_numpy(bits), "int8", scale).numpy(), expected
    )
    # Each channel's peak quantises to +-127 (0b0111_1111 / 0b1000_0001); flipping the sign bit
    # gives -1 / +1 in two's complement, so the result is -sign(peak) * scale.
    flat = tensor.flatten(1)
    peak_values = flat[torch.arange(64), flat.abs().argmax(dim=1)]
    flipped = flip(peak_values, 7, "int8", scale.flatten())
    torch.testing.assert_close(flipped, -torch.sign(peak_values) * scale.flatten(), rtol=0, atol=0)


def test_int8_zero_scale_is_masked_not_nan():
    zeros = torch.zeros(8)
    assert torch.equal(flip(zeros, 6, "int8", int8_scale(zeros)), zeros)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_double_flip_is_identity_nan_payloads_included(fmt, data):
    width = FORMATS[fmt].width
    patterns = np.array(
        data.draw(st.lists(st.integers(0, 2**width - 1), min_size=1, max_size=64)),
        dtype=UNSIGNED[fmt],
    )
    bits = torch.tensor(
        data.draw(
            st.lists(st.integers(0, width - 1), min_size=len(patterns), max_size=len(patterns))
        )
    )
    values = _tensor_from_bits(patterns, fmt)
    once = flip(values, bits, fmt)
    twice = flip(once, bits, fmt)
    np.testing.assert_array_equal(_bits_of(twice, fmt), patterns)
    changed = _bits_of(once, fmt) ^ patterns
    assert all(int(c).bit_count() == 1 for c in changed)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64), bit=st.integers(0, 7)
)
def test_int8_double_flip_returns_quantized_value(values, bit):
    tensor = torch.tensor(values, dtype=torch.float32)
    scale = int8_scale(tensor)
    twice = flip(flip(tensor, bit, "int8", scale), bit, "int8", scale)
    torch.testing.assert_close(twice, quantize(tensor, "int8", scale), rtol=0, atol=0)


def test_quantize_is_the_rounded_value():
    x = torch.tensor([1.0 + 2**-12, 3.14159])
    assert torch.equal(quantize(x, "fp16"), x.half().float())
    assert torch.equal(quantize(x, "bf16"), x.bfloat16().float())
    assert torch.equal(quantize(x, "fp32"), x)


def test_input_is_not_modified_and_dtype_is_kept():
    x = torch.randn(10, dtype=torch.float64)
    before = x.clone()
    out = flip(x, 3, "fp16")
    assert out.dtype == torch.float64 and torch.equal(x, before)


@pytest.mark.parametrize(
    ("call", "error", "hint"),
    [
        (lambda: flip(torch.ones(3), 0, "fp8"), ConfigError, "fp32, fp16, bf16, int8"),
        (lambda: flip(torch.ones(3), 16, "fp16"), ConfigError, "0..15"),
        (lambda: flip(torch.ones(3), -1, "fp32"), ConfigError, "0..31"),
        (lambda: flip(torch.ones(3), torch.tensor([0, 8, 1]), "int8", 1.0), ConfigError, "0..7"),
        (lambda: flip(torch.ones(3), torch.tensor([0.0]), "fp32"), ConfigError, "integer tensor"),
        (lambda: flip(torch.ones(3), torch.tensor([1, 2]), "fp32"), ConfigError, "broadcast"),
        (lambda: flip(torch.ones(3), 2.0, "fp32"), ConfigError, "int"),
        (lambda: flip(torch.ones(3), 1, "int8"), ConfigError, "int8_scale"),
        (lambda: flip(torch.ones(3), 1, "fp16", scale=0.1), ConfigError, "scale=None"),
        (lambda: flip(torch.ones(3), 1, "int8", scale=-1.0), ConfigError, ">= 0"),
        (
            lambda: flip(torch.ones(3, 4), 1, "int8", scale=torch.ones(3)),
            ConfigError,
            "channel_dim",
        ),
        (lambda: flip(torch.ones(3, dtype=torch.int32), 1, "fp32"), DataError, "floating-point"),
        (lambda: flip([1.0, 2.0], 1, "fp32"), DataError, "torch.as_tensor"),
        (lambda: flip(torch.tensor([float("nan")]), 1, "int8", 1.0), DataError, "finite"),
    ],
)
def test_invalid_input_raises_one_project_error_with_a_fix(call, error, hint):
    with pytest.raises(error, match=hint.replace(".", r"\.")) as caught:
        call()
    assert isinstance(caught.value, BitstormError)


def test_format_widths():
    assert {name: format_width(name) for name in FORMATS} == {
        "fp32": 32,
        "fp16": 16,
        "bf16": 16,
        "int8": 8,
    }


def _numpy_fault(patterns: np.ndarray, bits: np.ndarray, name: str) -> np.ndarray:
    """The fault models on raw unsigned patterns, written out with numpy's own shifts."""
    one = np.ones_like(patterns)
    if name.startswith("multi_bit"):
        width = int(name.partition(":")[2] or 2)
        mask = np.zeros_like(patterns)
        for offset in range(width):
            mask |= one << (bits + offset).astype(patterns.dtype)
        return patterns ^ mask
    mask = one << bits.astype(patterns.dtype)
    return patterns | mask if name == "stuck_at_1" else patterns & ~mask


FAULTS = ["multi_bit", "multi_bit:3", "multi_bit:8", "stuck_at_0", "stuck_at_1"]


@pytest.mark.parametrize("name", FAULTS)
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_float_fault_models_are_bit_exact_on_every_pattern(fmt, name):
    fault = fault_model(name)
    rng = np.random.default_rng(RNG_SEED + 9)
    patterns = _patterns(fmt, rng)
    bits = rng.integers(0, len(fault.bits(fmt)), size=patterns.size)
    result = corrupt(_tensor_from_bits(patterns, fmt), torch.from_numpy(bits), fmt, fault=fault)
    np.testing.assert_array_equal(_bits_of(result, fmt), _numpy_fault(patterns, bits, name))


@pytest.mark.parametrize("name", FAULTS)
def test_int8_fault_models_match_numpy(name):
    fault = fault_model(name)
    rng = np.random.default_rng(RNG_SEED + 10)
    values = rng.standard_normal(N_RANDOM).astype(np.float32) * 3
    bits = rng.integers(0, len(fault.bits("int8")), N_RANDOM)
    tensor = torch.from_numpy(values)
    scale = np.float32(int8_scale(tensor).item())
    q = np.clip(np.rint(values / scale), -128, 127).astype(np.int8).view(np.uint8)
    expected = _numpy_fault(q, bits, name).view(np.int8).astype(np.float32) * scale
    got = corrupt(tensor, torch.from_numpy(bits), "int8", int8_scale(tensor), fault)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_stuck_at_is_a_no_op_exactly_where_the_bit_already_holds(fmt):
    rng = np.random.default_rng(RNG_SEED + 11)
    patterns = _patterns(fmt, rng)
    bits = rng.integers(0, FORMATS[fmt].width, size=patterns.size)
    held = (patterns >> bits.astype(patterns.dtype)) & 1
    values = _tensor_from_bits(patterns, fmt)
    for name, value in (("stuck_at_0", 0), ("stuck_at_1", 1)):
        result = corrupt(values, torch.from_numpy(bits), fmt, fault=fault_model(name))
        unchanged = _bits_of(result, fmt) == patterns
        np.testing.assert_array_equal(unchanged, held == value)
        np.testing.assert_array_equal(same_bits(result, values).numpy(), held == value)


def test_multi_bit_is_adjacent_flips_and_stays_inside_the_word():
    values = torch.randn(1000)
    bits = torch.randint(0, 30, (1000,))
    twice = flip(flip(values, bits, "fp32"), bits + 1, "fp32")
    assert same_bits(corrupt(values, bits, "fp32", fault=fault_model("multi_bit")), twice).all()
    assert fault_model("multi_bit:3").bits("fp16") == range(14)
    with pytest.raises(ConfigError, match=r"0\.\.6 for int8 \(multi_bit:2 changes bits b\.\.b\+1"):
        corrupt(values, 7, "int8", int8_scale(values), fault_model("multi_bit"))


@pytest.mark.parametrize(
    "name, hint",
    [("multi_bit:1", "2 to 8"), ("multi_bit:9", "2 to 8"), ("flip", "bit_flip, multi_bit:K")],
)
def test_unknown_fault_models_are_refused_with_the_names(name, hint):
    with pytest.raises(ConfigError, match=hint):
        fault_model(name)
