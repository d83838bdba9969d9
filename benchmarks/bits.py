"""Flips per second of campaign.faults.bits.flip for each number format, against pytorchfi's own
bit-flip primitive (``single_bit_flip_func._flip_bit_signed``, an 8-bit quantised flip done one
value at a time in Python) measured in the same run.

    python benchmarks/bits.py [--values 10000000] [--device cpu|cuda] [--out FILE]

Prints a table and writes JSON (atomically). pytorchfi's flip is timed on far fewer values, since it
runs at Python speed; its rate is per value all the same, so the ratio is fair.
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch
from pytorchfi.neuron_error_models import single_bit_flip_func
from timing import best_seconds, timed

from bitstorm import __version__
from bitstorm.atomic import write_json_atomic
from campaign.faults.bits import FORMATS, flip, int8_scale


def pytorchfi_flips_per_second(count: int) -> float:
    logging.disable(logging.CRITICAL)  # pytorchfi logs every flip at INFO
    injector = single_bit_flip_func(torch.nn.Linear(4, 2), 1, input_shape=[4], bits=8)
    values = torch.randn(count)
    # pytorchfi quantises with int(v / max * 128) and no clamp, so the peak itself overflows 8 bits
    # and trips its own assertion: give it 1% headroom.
    peak = 1.01 * float(values.abs().max())
    bits = torch.randint(0, 8, (count,)).tolist()

    def flip_each() -> None:
        for value, bit in zip(values, bits, strict=True):
            injector._flip_bit_signed(value, peak, bit)

    return count / timed(flip_each)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=10_000_000)
    parser.add_argument("--pytorchfi-values", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bits.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(args.values, generator=generator).to(device)
    bits = {
        name: torch.randint(0, fmt.width, (args.values,), generator=generator).to(device)
        for name, fmt in FORMATS.items()
    }
    scale = int8_scale(values)
    rows = []
    for name in FORMATS:
        scale_arg = scale if name == "int8" else None
        seconds = best_seconds(
            lambda name=name, s=scale_arg: flip(values, bits[name], name, s), args.repeats, device
        )
        rows.append(
            {
                "format": name,
                "values": args.values,
                "seconds": seconds,
                "flips_per_s": args.values / seconds,
            }
        )
    reference = pytorchfi_flips_per_second(args.pytorchfi_values)
    for row in rows:
        row["vs_pytorchfi_int8_flip"] = row["flips_per_s"] / reference

    print(
        f"bitstorm {__version__}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, {args.values:,} values, best of {args.repeats}"
    )
    print(f"{'format':<8}{'seconds':>10}{'flips/s':>16}{'x pytorchfi':>14}")
    for row in rows:
        print(
            f"{row['format']:<8}{row['seconds']:>10.3f}{row['flips_per_s']:>16,.0f}"
            f"{row['vs_pytorchfi_int8_flip']:>14,.0f}"
        )
    print(
        f"{'pytorchfi':<8}{'':>10}{reference:>16,.0f}{1:>14}  "
        f"(_flip_bit_signed, {args.pytorchfi_values:,} values, one at a time)"
    )

    write_json_atomic(
        args.out,
        {
            "benchmark": "bits",
            "bitstorm": __version__,
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "rows": rows,
            "pytorchfi": {
                "primitive": "single_bit_flip_func._flip_bit_signed",
                "values": args.pytorchfi_values,
                "flips_per_s": reference,
            },
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
