"""Wall time to a model-level weight-fault SDC rate within +-margin at a confidence.

    python benchmarks/time_to_margin.py [--checkpoint bitstorm-default/runs/digits_linear]
        [--margin 0.005] [--confidence 0.99] [--pilot 4] [--images 128] [--out FILE]

Two ways to the same number, on the same machine in one run:
- bitstorm: the batched engine with the sequential stratified plan (campaign.sequential): a
  pilot per layer x bit stratum, then rounds of Neyman-allocated trials until the stratified
  estimate's half-width meets the margin.
- pytorchfi 0.6.0 in its best mode for weights (one fault applied to a whole batch of images per
  forward) with uniform sampling sized by Leveugle et al. (DATE 2009) for the same margin.

The pytorchfi sample shares each fault among a batch of images, so its trials are clustered: it
is reported with Wilson's interval over trials (what the count assumes) and with the interval
over the effective sample size (campaign.analysis.stats.effective_sample_size), which is the
honest one and usually misses the margin. Independent trials (one image per fault, what
Leveugle's count assumes) cost pytorchfi one forward each: timed on 256 trials and extrapolated,
and labelled so.
The model is the embedded default's baseline ResNet-18 (run ``python campaign/run.py`` first).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from timing import timed

from bitstorm.atomic import write_json_atomic
from campaign.analysis.results import StratumCounts
from campaign.analysis.stats import (
    effective_sample_size,
    leveugle_sample_size,
    wilson_interval,
)
from campaign.faults.engine import Engine
from campaign.faults.reference import PytorchfiBatched, random_weight_trials
from campaign.faults.sites import SiteSpace, find_sites
from campaign.images import campaign_data, load_models, select_images
from campaign.plan import Shard, make_plan
from campaign.sequential import run_rounds
from campaign.spec import CampaignSpec
from trainers.checkpoint import load_checkpoint, resolve_checkpoint

MODEL = "model"


def bitstorm_run(spec: CampaignSpec, model, images, space: SiteSpace) -> dict:
    """The sequential plan (campaign.sequential.run_rounds, as the campaign runs it),
    evaluated in process: no Ray, no Parquet, so the timing is the engine's and the plan's."""
    started = time.perf_counter()
    engine = Engine(model, images.images[:2], device="cpu", batch_size=spec.resources.batch_size)
    cache = engine.golden(images.images, space.names(), spec.kinds)
    n_images = len(images.indices)
    plan = make_plan(spec, {MODEL: list(space)}, {MODEL: n_images})
    population = {s.layer: s.sites * n_images for s in plan}
    trials: Counter[tuple[str, int]] = Counter()
    sdc: Counter[tuple[str, int]] = Counter()
    rounds = [0]

    def run(shards: list[Shard], round: int) -> None:
        rounds[0] = round
        for shard in shards:
            group = shard.trials(n_images)
            outcome = engine.run(cache, group)
            for bit, hit in zip(group.bit.tolist(), outcome.sdc.tolist(), strict=True):
                trials[shard.layer, bit] += 1
                sdc[shard.layer, bit] += hit

    def strata(_limit: int) -> list[StratumCounts]:  # every shard run so far is below it
        return [
            StratumCounts(
                MODEL, "weight", layer, "fp32", bit, n, sdc[layer, bit], population[layer]
            )
            for (layer, bit), n in sorted(trials.items())
        ]

    run(plan, 0)
    (status,) = run_rounds(spec, plan, strata, run)
    seconds = time.perf_counter() - started
    rate = status.rate
    return {
        "seconds": seconds,
        "trials": rate.trials,
        "rounds": rounds[0] + 1,
        "met": status.met,
        "rate": rate.rate,
        "low": rate.low,
        "high": rate.high,
        "margin": rate.margin,
    }


def pytorchfi_run(spec: CampaignSpec, model, images, space: SiteSpace, seed: int) -> dict:
    """Leveugle-sized uniform sample over (weight, bit, image), each fault on a batch of
    images, as pytorchfi runs weight faults fastest."""
    started = time.perf_counter()
    sites = list(space)
    n_images = len(images.indices)
    population = sum(s.weight_elements for s in sites) * 32 * n_images
    needed = leveugle_sample_size(population, spec.margin, spec.confidence)
    faults = math.ceil(needed / n_images)
    rng = np.random.default_rng(seed)
    baseline = PytorchfiBatched(model, images.images)
    with torch.no_grad():
        golden = model(images.images).argmax(dim=1)
    per_fault = []
    for trial in random_weight_trials(sites, rng, faults):
        logits = baseline.weight_fault(images.images, trial)
        per_fault.append(int((logits.argmax(dim=1) != golden).sum()))
    seconds = time.perf_counter() - started
    single = _single_image_seconds(baseline, images.images, sites, rng, samples=256)
    hits, total = sum(per_fault), faults * n_images
    low, high = wilson_interval(hits, total, spec.confidence)
    effective = effective_sample_size(per_fault, [n_images] * faults)
    honest_low, honest_high = wilson_interval(
        round(hits / total * effective), round(effective), spec.confidence
    )
    return {
        "seconds": seconds,
        "trials": total,
        "leveugle_size": needed,
        "faults": faults,
        "rate": hits / total,
        "low": low,
        "high": high,
        "effective_sample_size": effective,
        "low_effective": honest_low,
        "high_effective": honest_high,
        "independent_seconds_per_trial": single,
        "independent_seconds_extrapolated": single * needed,
    }


def _single_image_seconds(baseline, images, sites, rng, samples: int) -> float:
    """Seconds per trial when every trial has its own fault and image (independent trials, as
    Leveugle's count assumes): pytorchfi then runs one single-image forward per trial."""

    def run_all() -> None:
        for trial in random_weight_trials(sites, rng, samples):
            image = int(rng.integers(len(images)))
            baseline.weight_fault(images[image : image + 1], trial)

    return timed(run_all)[0] / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bitstorm-default/runs/digits_linear")
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--pilot", type=int, default=4, help="trials per stratum to start with")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_margin.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_checkpoint(checkpoint)[0].eval()
    spec = CampaignSpec.parse(
        {
            "models": [{"name": MODEL, "checkpoint": str(checkpoint)}],
            "images": args.images,
            "kinds": ["weight"],
            "sampling": {"margin": args.margin, "confidence": args.confidence},
            "trials_per_stratum": args.pilot,
            "seed": args.seed,
        }
    )
    data = campaign_data(spec, load_models(spec))
    images = select_images(spec, {MODEL: model}, data)[MODEL]
    space = find_sites(model, images.images[:1], types=spec.layer_types)
    ours = bitstorm_run(spec, model, images, space)
    theirs = pytorchfi_run(spec, model, images, space, args.seed)
    agree = ours["low"] <= theirs["high_effective"] and theirs["low_effective"] <= ours["high"]
    speedup = theirs["seconds"] / ours["seconds"]
    print(
        f"weight-fault SDC rate of {checkpoint} ({len(images.indices)} golden-correct digits "
        f"images, CPU, {torch.get_num_threads()} threads); target +-{args.margin:.2%} at "
        f"{args.confidence:.0%}"
    )
    print(f"{'system':<44}{'trials':>9}{'seconds':>9}  SDC rate [interval]")
    print(
        f"{'bitstorm: engine + sequential stratified':<44}{ours['trials']:>9,}"
        f"{ours['seconds']:>9.1f}  {ours['rate']:.3%} [{ours['low']:.3%}, {ours['high']:.3%}]"
        f" (+-{ours['margin']:.3%}, {ours['rounds']} rounds"
        f"{'' if ours['met'] else ', margin NOT met'})"
    )
    print(
        f"{'pytorchfi best mode, Leveugle uniform':<44}{theirs['trials']:>9,}"
        f"{theirs['seconds']:>9.1f}  {theirs['rate']:.3%} [{theirs['low']:.3%}, "
        f"{theirs['high']:.3%}] over trials; [{theirs['low_effective']:.3%}, "
        f"{theirs['high_effective']:.3%}] over {theirs['effective_sample_size']:,.0f} "
        "effective trials"
    )
    print(
        f"{'pytorchfi, one image per fault (independent)':<44}{theirs['leveugle_size']:>9,}"
        f"{theirs['independent_seconds_extrapolated']:>9.1f}  (extrapolated from 256 trials at "
        f"{theirs['independent_seconds_per_trial'] * 1000:.1f} ms each)"
    )
    independent = theirs["independent_seconds_extrapolated"] / ours["seconds"]
    print(
        f"time ratio pytorchfi best mode / bitstorm: {speedup:.1f}x (target >= 20x); "
        f"independent / bitstorm: {independent:.0f}x; trials ratio "
        f"{theirs['trials'] / ours['trials']:.1f}x; estimates agree within their intervals: "
        f"{'yes' if agree else 'NO'}"
    )
    write_json_atomic(
        args.out,
        {
            "checkpoint": str(checkpoint),
            "margin": args.margin,
            "confidence": args.confidence,
            "bitstorm": ours,
            "pytorchfi": theirs,
            "speedup": speedup,
            "agree": agree,
            "threads": torch.get_num_threads(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
