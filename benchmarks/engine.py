"""The batched engine against pytorchfi's best mode and a plain batched forward, in one run on
one machine, on the same trials.

    python benchmarks/engine.py [--model resnet18] [--image-size 32] [--images 256] [--device cpu]

- weight faults: sampled uniformly over the weight fault space (every weight element and bit
  equally likely); pytorchfi applies each fault to a batch of all images in one forward.
- neuron faults: equal trials per layer (the paper's protocol); pytorchfi puts one fault on each
  batch element of one forward.
- last layer, exhaustively: every weight x bit x image of the final Linear (the engine needs no
  forward there); pytorchfi's rate for it is its weight-mode rate above.
- the goldeneye protocol: the same neuron and weight trials with range restriction (bounds
  profiled on other random images) and goldeneye's SDC rule, against the engine without them.
- per technique that settles trials without a forward (campaign.faults.masking): the share of
  the trials it settled and the time it saved (the same trials with it off, minus with it on).

``--head text`` puts a text head (random class embeddings) on the backbone.

The "bound" is what suffix-only evaluation can gain over a full-network method from arithmetic
alone: 1 / (mean fraction of the network's FLOPs left after the faulty layer), weighted as the
trials are. Prints a table, the top of a profile of the engine, and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import random
from pathlib import Path

import numpy as np
import torch
from timing import best_seconds, timed
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bitstorm import __version__
from bitstorm.atomic import write_json_atomic
from campaign.analysis.results import group_by
from campaign.faults.engine import Engine
from campaign.faults.inject import RangeRestriction
from campaign.faults.reference import PytorchfiBatched, Trial, random_weight_trials
from campaign.faults.sites import activation_peaks
from campaign.faults.trials import TrialGroup
from trainers.models import build_model


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def suffix_fractions(engine: Engine, images: torch.Tensor, layers: list[str]) -> dict[str, float]:
    """FLOPs of each layer's suffix over the FLOPs of the whole network, for one image."""
    one = images[:1].to(engine.device)
    with torch.no_grad():
        total = flops(lambda: engine.model(one))
        fractions = {}
        for layer in layers:
            cut = engine.traced.cut(layer, 0)
            _, *values = engine.traced.golden_module((cut.node, *cut.externals))(one)
            fractions[layer] = flops(lambda cut=cut, values=values: cut.suffix(*values)) / total
    return fractions


def to_groups(trials: list[tuple[Trial, int]]) -> list[TrialGroup]:
    by_key = group_by(trials, lambda item: (item[0].kind, item[0].layer, item[0].fmt))
    return [
        TrialGroup(
            kind,
            layer,
            fmt,
            torch.tensor([t.index for t, _ in items]),
            torch.tensor([t.bit for t, _ in items]),
            torch.tensor([image for _, image in items]),
        )
        for (kind, layer, fmt), items in by_key.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--head", default="linear", choices=["linear", "text"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=256)
    # Enough trials that which layers the random faults land in matters little (32 weight
    # faults gave ratios some 30% apart from run to run).
    parser.add_argument("--neuron-batches", type=int, default=32)
    parser.add_argument("--weight-faults", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    embeddings = torch.randn(args.classes, 64) if args.head == "text" else None
    model = build_model(args.model, args.head, args.classes, embeddings).to(device).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size, device=device)
    engine = Engine(model, images[:1], device=device, batch_size=args.images)
    layers = [
        s
        for s in engine.sites.values()
        if s.calls == 1 and isinstance(model.get_submodule(s.name), nn.Conv2d | nn.Linear)
    ]
    final = layers[-1].name
    baseline = PytorchfiBatched(model, images)

    # Plain batched forward: the ceiling of any full-network method.
    with torch.no_grad():
        plain_s = best_seconds(lambda: model(images), 3, device)
    plain_rate = args.images / plain_s

    # Neuron faults, equal trials per layer; trial i of a batch on image i.
    neuron_batches = [
        [
            (
                Trial(
                    "neuron",
                    site.name,
                    rng.randrange(site.neuron_elements),
                    rng.randrange(32),
                    "fp32",
                ),
                i,
            )
            for i, site in enumerate(rng.choice(layers) for _ in range(args.images))
        ]
        for _ in range(args.neuron_batches)
    ]
    pfi_neuron_s, pfi_neuron_logits = 0.0, []
    for batch in neuron_batches:
        seconds, logits = timed(
            lambda b=batch: baseline.neuron_batch(images, [t for t, _ in b]), device
        )
        pfi_neuron_s += seconds
        pfi_neuron_logits.append(logits)
    neuron_trials = [t for batch in neuron_batches for t in batch]
    neuron_groups = to_groups(neuron_trials)
    cache = engine.golden(images)  # no layers named: each run makes its golden pass, as before
    engine.run_many(cache, to_groups(neuron_trials[:64]))  # warm-up: traces and caches
    settled_before = engine.settled.copy()
    engine_neuron_s, neuron_out = timed(lambda: engine.run_many(cache, neuron_groups), device)
    neuron_settled = engine.settled - settled_before
    # The same trials with every settling technique off: what the techniques saved.
    unmasked = Engine(model, images[:1], device=device, batch_size=args.images, settle_masked=False)
    unmasked_cache = unmasked.golden(images)
    unmasked.run_many(unmasked_cache, to_groups(neuron_trials[:64]))
    unmasked_neuron_s, _ = timed(lambda: unmasked.run_many(unmasked_cache, neuron_groups), device)

    # Weight faults uniform over the weight space; each on every image.
    weights = [site.weight_elements for site in layers]
    weight_faults = random_weight_trials(
        layers, np.random.default_rng(args.seed), args.weight_faults
    )
    pfi_weight_s, pfi_weight_logits = 0.0, []
    for fault in weight_faults:
        seconds, logits = timed(lambda f=fault: baseline.weight_fault(images, f), device)
        pfi_weight_s += seconds
        pfi_weight_logits.append(logits)
    weight_trials = [(fault, image) for fault in weight_faults for image in range(args.images)]
    weight_groups = to_groups(weight_trials)
    engine.run_many(cache, to_groups(weight_trials[:64]))
    settled_before = engine.settled.copy()
    engine_weight_s, _ = timed(lambda: engine.run_many(cache, weight_groups), device)
    weight_settled = engine.settled - settled_before
    unmasked.run_many(unmasked_cache, to_groups(weight_trials[:64]))
    unmasked_weight_s, _ = timed(lambda: unmasked.run_many(unmasked_cache, weight_groups), device)

    # The goldeneye protocol on the same trials: range restriction and its SDC rule.
    profiled = torch.randn_like(images)
    bounds = activation_peaks(engine.model, profiled, [s.name for s in layers], args.images)
    goldeneye = Engine(
        model,
        images[:1],
        device=device,
        batch_size=args.images,
        restriction=RangeRestriction(bounds),
        non_finite_sdc=False,
    )
    goldeneye_cache = goldeneye.golden(images)
    goldeneye.run_many(goldeneye_cache, to_groups(neuron_trials[:64]))
    goldeneye_neuron_s, _ = timed(
        lambda: goldeneye.run_many(goldeneye_cache, neuron_groups), device
    )
    goldeneye_weight_s, _ = timed(
        lambda: goldeneye.run_many(goldeneye_cache, weight_groups), device
    )

    # Agreement on these very trials (top-1, NaN counted as its own class).
    def top1(logits: torch.Tensor) -> torch.Tensor:
        return torch.where(
            logits.isnan().any(dim=1), -1, logits.nan_to_num(nan=-float("inf")).argmax(dim=1)
        )

    engine_top1 = {}
    for group, out in zip(neuron_groups, neuron_out, strict=True):
        for index, bit, image, faulty in zip(
            group.index.tolist(),
            group.bit.tolist(),
            group.image.tolist(),
            out.faulty_top1.tolist(),
            strict=True,
        ):
            engine_top1[(group.layer, index, bit, image)] = faulty
    agree = total = 0
    for batch, logits in zip(neuron_batches, pfi_neuron_logits, strict=True):
        for (trial, image), ref in zip(batch, top1(logits).tolist(), strict=True):
            agree += engine_top1[(trial.layer, trial.index, trial.bit, image)] == ref
            total += 1

    # Last layer, exhaustively.
    sweep_s, sweep_trials = timed(
        lambda: sum(
            len(group) for group, _ in engine.sweep_layer(cache, final, "fp32", sites_per_chunk=256)
        ),
        device,
    )

    # Arithmetic bounds.
    fractions = suffix_fractions(engine, images, [s.name for s in layers])
    weight_bound = 1 / (sum(fractions[s.name] * s.weight_elements for s in layers) / sum(weights))
    neuron_bound = 1 / (sum(fractions.values()) / len(fractions))

    rows = []

    def row(name, trials, seconds, reference_rate, bound=None):
        rate = trials / seconds
        rows.append(
            {
                "measure": name,
                "trials": trials,
                "seconds": seconds,
                "trials_per_s": rate,
                "vs_pytorchfi": rate / reference_rate,
                "vs_plain_forward": rate / plain_rate,
                "bound": bound,
            }
        )

    pfi_neuron_rate = len(neuron_trials) / pfi_neuron_s
    pfi_weight_rate = len(weight_trials) / pfi_weight_s
    rows.append(
        {
            "measure": "plain batched forward (images/s)",
            "trials": args.images,
            "seconds": plain_s,
            "trials_per_s": plain_rate,
            "vs_pytorchfi": None,
            "vs_plain_forward": 1.0,
            "bound": None,
        }
    )
    row(
        "pytorchfi neuron, 1 fault per batch element",
        len(neuron_trials),
        pfi_neuron_s,
        pfi_neuron_rate,
    )
    row("pytorchfi weight, 1 fault per batch", len(weight_trials), pfi_weight_s, pfi_weight_rate)
    row(
        "engine neuron, equal per layer",
        len(neuron_trials),
        engine_neuron_s,
        pfi_neuron_rate,
        neuron_bound,
    )
    row(
        "engine weight, uniform over weights",
        len(weight_trials),
        engine_weight_s,
        pfi_weight_rate,
        weight_bound,
    )
    row(f"engine last layer ({final}) exhaustive", sweep_trials, sweep_s, pfi_weight_rate)
    row(
        "engine neuron, goldeneye protocol", len(neuron_trials), goldeneye_neuron_s, pfi_neuron_rate
    )
    row(
        "engine weight, goldeneye protocol", len(weight_trials), goldeneye_weight_s, pfi_weight_rate
    )
    techniques = [
        {
            "technique": name,
            "kind": kind,
            "settled": count,
            "share": count / trials,
            "seconds_saved": saved,
        }
        for kind, settled, trials, saved in (
            ("neuron", neuron_settled, len(neuron_trials), unmasked_neuron_s - engine_neuron_s),
            ("weight", weight_settled, len(weight_trials), unmasked_weight_s - engine_weight_s),
        )
        for name, count in (settled or {"none": 0}).items()
    ]
    protocol_speed = {
        "neuron": engine_neuron_s / goldeneye_neuron_s,
        "weight": engine_weight_s / goldeneye_weight_s,
    }

    profile = cProfile.Profile()
    profile.enable()
    engine.run_many(cache, neuron_groups)
    profile.disable()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(8)

    print(
        f"bitstorm {__version__}, torch {torch.__version__}, {args.model} at "
        f"{args.image_size}x{args.image_size}, {args.head} head, {args.classes} classes, "
        f"{args.images} images, "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'measure':<46}{'trials':>10}{'trials/s':>13}{'x pytorchfi':>13}{'x plain':>9}"
        f"{'bound':>8}{'% of bound':>12}"
    )
    for r in rows:
        vs_pfi = f"{r['vs_pytorchfi']:.2f}" if r["vs_pytorchfi"] is not None else "-"
        bound = f"{r['bound']:.2f}" if r["bound"] else "-"
        share = f"{100 * r['vs_pytorchfi'] / r['bound']:.0f}%" if r["bound"] else "-"
        print(
            f"{r['measure']:<46}{r['trials']:>10,}{r['trials_per_s']:>13,.0f}{vs_pfi:>13}"
            f"{r['vs_plain_forward']:>9.2f}{bound:>8}{share:>12}"
        )
    print(f"neuron top-1 agreement with pytorchfi on the benchmarked trials: {agree}/{total}")
    print(f"{'settled without a forward':<34}{'kind':<8}{'trials':>10}{'share':>9}{'saved s':>10}")
    for t in techniques:
        print(
            f"{t['technique']:<34}{t['kind']:<8}{t['settled']:>10,}{t['share']:>9.1%}"
            f"{t['seconds_saved']:>10.2f}"
        )
    print(
        "goldeneye protocol speed / bitstorm protocol speed, same trials: "
        + ", ".join(f"{kind} {ratio:.2f}" for kind, ratio in protocol_speed.items())
    )
    print("where the engine's neuron time goes (cProfile, by own time):")
    print("\n".join(stream.getvalue().splitlines()[6:20]))
    write_json_atomic(
        args.out,
        {
            "benchmark": "engine",
            "bitstorm": __version__,
            "torch": torch.__version__,
            "model": args.model,
            "head": args.head,
            "image_size": args.image_size,
            "classes": args.classes,
            "images": args.images,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "rows": rows,
            "bounds": {"weight_uniform": weight_bound, "neuron_equal_per_layer": neuron_bound},
            "suffix_flop_fractions": fractions,
            "neuron_agreement": [agree, total],
            "goldeneye_vs_bitstorm_speed": protocol_speed,
            "settled_without_forward": techniques,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
