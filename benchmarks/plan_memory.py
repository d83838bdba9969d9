"""The driver's memory for a plan of 10^8 trials: what a campaign holds before any trial runs (the
shards, their packing into files and the manifest that lists them), measured as the growth of
this process's resident set. The driver never holds trial rows, so this must not grow with the
number of trials beyond the shard descriptors.

    python benchmarks/plan_memory.py [--trials 100000000] [--out FILE]

Two ResNet-18 checkpoints with random weights on digits, every Conv/Linear layer, weights and
neurons, fp32, all 32 bits; ``trials_per_stratum`` chosen to reach ``--trials``. Prints a table
and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

from bitstorm import __version__
from bitstorm.atomic import write_json_atomic
from campaign.images import select_images
from campaign.plan import make_packs, make_plan
from campaign.runner import validate
from campaign.spec import CampaignSpec
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model


def resident_mib() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = []
        for head in ("linear", "text_random"):
            cfg = TrainConfig(backbone="resnet18", head=head, dataset="digits")
            model = build_model("resnet18", head, 10, embedding_dim=384, seed=1)
            path = save_checkpoint(
                Path(folder) / head,
                model,
                cfg,
                class_names=tuple(map(str, range(10))),
                epoch=1,
                history=[],
            )
            models.append({"name": head, "checkpoint": str(path)})
        base = {"models": models, "images": 128, "image_selection": "any", "output": folder}
        spec = CampaignSpec.parse({**base, "name": "plan", "trials_per_stratum": 1})
        checked = validate(spec)
        images = select_images(spec, checked.models, checked.data)
        counts = {name: len(i.indices) for name, i in images.items()}
        strata = len(make_plan(spec, checked.sites, counts)) * len(spec.bits_of("fp32"))
        per_stratum = math.ceil(args.trials / strata)
        spec = CampaignSpec.parse({**base, "name": "plan", "trials_per_stratum": per_stratum})
        before = resident_mib()
        started = time.perf_counter()
        plan = make_plan(spec, checked.sites, counts)
        packs = make_packs(plan, counts, spec.shard_size)
        manifest = json.dumps(
            {
                "shard_list": [vars(s) for s in plan],
                "packs": [[s.id for s in p.shards] for p in packs],
            }
        )
        seconds = time.perf_counter() - started
        grown = resident_mib() - before
        trials = sum(s.size(counts[s.model]) for s in plan)
    row = {
        "trials": trials,
        "strata": strata,
        "trials_per_stratum": per_stratum,
        "shards": len(plan),
        "files": len(packs),
        "manifest_plan_bytes": len(manifest),
        "rss_growth_mib": grown,
        "seconds": seconds,
    }
    print(f"bitstorm {__version__}, 2 ResNet-18 models on digits, a plan only (nothing runs)")
    for key, value in row.items():
        print(f"{key:<22}{value:>16,.1f}" if isinstance(value, float) else f"{key:<22}{value:>16,}")
    write_json_atomic(
        args.out,
        {"benchmark": "plan_memory", "bitstorm": __version__, "machine": platform.machine()} | row,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
