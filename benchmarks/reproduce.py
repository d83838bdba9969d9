"""The digits reproduction (docs/reproduction.md): the default run's two ResNet-18s, baseline vs
text head, weight and neuron faults, under goldeneye's protocol and bitstorm's, each sampled
sequentially until every overall SDC rate is known to ``--relative-margin`` of itself, the last
layer counted exhaustively; then one-at-a-time ablations of goldeneye's choices, to see which
one moves the answer most. Writes the Markdown document and a JSON of every number in it.

    python campaign/run.py               # once: trains the two models (bitstorm-default/)
    python benchmarks/reproduce.py       # then: the campaigns and docs/reproduction.md

Nothing here is tuned to a result: the protocols are the spec's bundles as they are, and the
ablations change one named choice each. One choice is not goldeneye's: sequential rounds put
their trials where the variance is (Neyman) rather than equally per stratum; that changes what a
margin costs, never what is estimated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from campaign.analysis.build import build_report
from campaign.analysis.results import Results, open_results, weights
from campaign.analysis.summary import OVERALL_NAMES, Comparison, Options, Report
from campaign.default import default_campaigns
from campaign.runner import run_campaign
from campaign.spec import CampaignSpec
from campaign.store import VALUE_RANGES

# As issue 12 quotes the paper (ResNet-18 on ImageNet): last-layer and overall improvement,
# and the Top2Diff improvement in percentage points.
PAPER_ROW = {"last_layer": 2.87, "overall": 1.91, "delta_top2diff": 3.07}
# One goldeneye choice switched to bitstorm's at a time.
ABLATIONS = {
    "no range restriction": {"range_restriction": False},
    "non-finite logits are SDCs": {"non_finite_sdc": True},
    "images every model gets right": {"image_selection": "every_model_correct"},
}


def campaign_specs(base: CampaignSpec, args: argparse.Namespace) -> dict[str, CampaignSpec]:
    """The campaigns of the reproduction by label: both protocols, then the ablations."""
    common = {
        "models": base.models,
        "images": args.images,
        "kinds": ["weight", "neuron"],
        "sampling": "sequential",
        # Where the rounds put their trials changes no estimate, only what a margin costs:
        # equal allocation spends as much on strata that never corrupt as on those that do.
        "allocation": "neyman",
        "relative_margin": args.relative_margin,
        "confidence": args.confidence,
        "trials_per_stratum": args.pilot,
        "max_trials": args.max_trials,
        "exhaustive_last_layer": True,
        "output": base.output,
        "resources": base.resources,
    }
    specs = {
        protocol: CampaignSpec(name=f"reproduce_{protocol}", protocol=protocol, **common)
        for protocol in ("goldeneye", "bitstorm")
    }
    if not args.no_ablations:
        for label, change in ABLATIONS.items():
            name = "reproduce_goldeneye_" + "_".join(label.split()[:2]).replace("-", "_")
            specs[label] = CampaignSpec(name=name, protocol="goldeneye", **common, **change)
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bitstorm-default", help="the default run's folder")
    parser.add_argument("--relative-margin", type=float, default=0.10)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--pilot", type=int, default=16, help="trials per stratum, first round")
    parser.add_argument("--max-trials", type=int, default=3_000_000, help="per model x kind")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--doc", default="docs/reproduction.md")
    parser.add_argument("--json", default="docs/reproduction.json")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the document from --json's facts"
    )
    args = parser.parse_args()
    if args.render_only:
        facts = json.loads(Path(args.json).read_text())
        if "encoder" not in facts:  # facts from before the document named the encoder
            campaigns = Path(args.output).resolve() / "campaigns"
            facts["encoder"] = _encoder(open_results(str(campaigns / "reproduce_goldeneye")))
            write_json_atomic(args.json, facts)
        write_bytes_atomic(args.doc, render(facts).encode())
        print(f"wrote {args.doc} from {args.json}")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    base = default_campaigns(Path(args.output).resolve())[0]  # trains the models if needed
    specs = campaign_specs(base, args)
    roots, seconds = {}, {}
    for label, spec in specs.items():
        began = time.perf_counter()
        roots[label] = run_campaign(spec).root
        seconds[label] = time.perf_counter() - began
    wall = time.perf_counter() - started
    options = Options(confidence=args.confidence)
    reports = {label: build_report([root], options) for label, root in roots.items()}
    facts = reproduction_facts(reports, roots, seconds, wall, args)
    write_json_atomic(args.json, facts)
    document = render(facts)
    write_bytes_atomic(args.doc, document.encode())
    print(document)
    print(f"wrote {args.doc} and {args.json} in {wall:.0f} s")


# --- facts -------------------------------------------------------------------------------------


def reproduction_facts(
    reports: dict[str, Report],
    roots: dict[str, str],
    seconds: dict[str, float],
    wall: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    results = {label: open_results(root) for label, root in roots.items()}
    compared = {label: [_comparison(c) for c in r.comparisons] for label, r in reports.items()}
    headline = {p: compared[p] for p in ("goldeneye", "bitstorm")}
    ablations = {label: rows for label, rows in compared.items() if label in ABLATIONS}
    return {
        "command": "python benchmarks/reproduce.py"
        + (f" --relative-margin {args.relative_margin}" if args.relative_margin != 0.10 else ""),
        "wall_seconds": wall,
        "campaign_seconds": seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "relative_margin": args.relative_margin,
        "confidence": args.confidence,
        "headline": headline,
        "ablations": ablations,
        "models": _models(reports["goldeneye"], reports["bitstorm"]),
        "last_layer_by_bit": {p: _census_by(results[p], "bit") for p in ("goldeneye", "bitstorm")},
        "last_layer_by_value": {
            p: _census_by(results[p], "value_range, top1") for p in ("goldeneye", "bitstorm")
        },
        "non_finite": {p: _non_finite(results[p]) for p in ("goldeneye", "bitstorm")},
        "encoder": _encoder(results["goldeneye"]),
        "paper": PAPER_ROW,
    }


def _comparison(c: Comparison) -> dict[str, Any]:
    def ratio(result: Any) -> dict[str, Any] | None:
        return None if result is None else dataclasses.asdict(result)

    def rate(model: Any) -> dict[str, Any]:
        kind = model.kinds[c.kind]
        last = kind.layers[kind.last_layer]
        return {
            "overall": dataclasses.asdict(kind.overall),
            "overall_rule": kind.overall_rule,
            "other": None if kind.alternative is None else dataclasses.asdict(kind.alternative),
            "last_layer": dataclasses.asdict(last),
            "last_layer_name": kind.last_layer,
            "trials": kind.overall.trials,
        }

    return {
        "kind": c.kind,
        "baseline": rate(c.baseline),
        "text": rate(c.text),
        "last_layer": ratio(c.last_layer),
        "overall": ratio(c.overall),
        "other": ratio(c.alternative),
        "overall_rule": c.text.kinds[c.kind].overall_rule,
        "delta_top2diff": c.delta_top2diff,
    }


def _models(goldeneye: Report, bitstorm: Report) -> dict[str, Any]:
    models = {}
    for model in goldeneye.models:
        other = next(m for m in bitstorm.models if m.name == model.name)
        models[model.name] = {
            "head": model.facts.head,
            "val_top1": model.facts.val_top1,
            "val_top2diff": model.facts.val_top2diff,
            "images_goldeneye": model.images,
            "images_bitstorm": other.images,
            "campaign_top2diff_bitstorm": other.golden_top2diff,
        }
    return models


def _encoder(results: Results) -> str:
    """The text head's class embeddings, as the default run recorded them."""
    from embeddings.store import load_embeddings

    for entry in results.manifest["spec"]["models"]:
        if entry.get("embeddings"):
            return f"class embeddings from {load_embeddings(Path(entry['embeddings'])).encoder}"
    return "no text head"


def _census_by(results: Results, columns: str) -> list[dict[str, Any]]:
    rows = results.sql(
        f"select model, kind, {columns}, sum(trials) n, sum(sdc) k, sum(non_finite) f "
        f"from census group by all order by all"
    ).df()
    return rows.to_dict("records")


def _non_finite(results: Results) -> dict[str, Any]:
    """Per model and kind: the fault-space-weighted share of trials whose logits are not all
    finite, and the share of SDCs that are such trials (under goldeneye's rule, none: they are
    not SDCs)."""
    counted_as_sdc = bool(results.manifest["spec"].get("non_finite_sdc", True))
    rows = results.sql(
        "select model, kind, layer, format, bit, sum(n), sum(k), sum(f) from ("
        "select model, kind, layer, format, bit, count(*) n, sum(sdc::int) k, "
        "sum(non_finite::int) f from trials group by all union all "
        "select model, kind, layer, format, bit, sum(trials), sum(sdc), sum(non_finite) "
        "from census group by all) group by all"
    ).fetchall()
    strata = {(s.model, s.kind, s.layer, s.fmt, s.bit): s for s in results.strata()}
    out: dict[str, Any] = {}
    for model, kind in {(r[0], r[1]) for r in rows}:
        mine = [r for r in rows if (r[0], r[1]) == (model, kind)]
        members = [strata[tuple(r[:5])] for r in mine]
        weight = weights(members, results.overall)
        total = sum(weight)
        non_finite = sum(w * r[7] / r[5] for w, r in zip(weight, mine, strict=True)) / total
        sdc = sum(w * r[6] / r[5] for w, r in zip(weight, mine, strict=True)) / total
        nf_sdc = non_finite if counted_as_sdc else 0.0
        out[f"{model}/{kind}"] = {
            "non_finite_trials": non_finite,
            "sdc": sdc,
            "non_finite_share_of_sdc": nf_sdc / sdc if sdc else None,
        }
    return out


# --- the document -------------------------------------------------------------------------------


def render(facts: dict[str, Any]) -> str:
    lines = [
        "# Reproduction on digits: does the text-guided head make ResNet-18 more resilient?",
        "",
        f"Made by `{facts['command']}` (after `python campaign/run.py` trained the two models) in "
        f"{facts['wall_seconds']:.0f} s on {facts['machine']}. Rates, intervals and the "
        "conclusion come from that run; wall times vary between machines, the rates with the "
        "models (their training is seeded, but thread counts and the text encoder available "
        "offline change the weights).",
        "",
        "Protocols (docs/protocols.md): **goldeneye** is the paper's tool as read from its code "
        "(range restriction with bounds from the training split, NaN to +bound; a non-finite "
        "logit is not an SDC; each model's own correct images with Top2Diff > 0; overall = mean "
        "of per-layer rates; Top2Diff over the whole validation split). **bitstorm** is ours (no "
        "restriction; any non-finite logit is an SDC; images every model gets right; overall "
        "weighted by fault-space share; Top2Diff over the campaign images).",
        "",
        f"Every overall rate was sampled sequentially until its {facts['confidence']:.0%} "
        f"interval's half-width was at most {facts['relative_margin']:.0%} of the estimate; the "
        "last layer (`fc`, and the text head's class Linear `fc.classes`) was counted "
        "exhaustively (every site x bit x image, no sampling error). One choice differs from "
        "goldeneye's bundle in every campaign here: sequential rounds put their trials where "
        "the variance is (`allocation: neyman`) rather than equally per stratum, which changes "
        "what a margin costs, never what is estimated.",
        "",
        "## Headline",
        "",
        "| Protocol | Faults | Last-layer improvement (exact) | Overall improvement (95% CI) "
        "| half-width / estimate | Baseline overall SDC | Text overall SDC | ΔTop2Diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for protocol in ("goldeneye", "bitstorm"):
        for c in facts["headline"][protocol]:
            lines.append(_headline_row(protocol, c))
    paper = facts["paper"]
    lines += [
        f"| paper (ResNet-18, ImageNet) | neurons | {paper['last_layer']:.2f}x | "
        f"{paper['overall']:.2f}x | | | | +{paper['delta_top2diff']:.2f} pp |",
        "",
        "Improvement = baseline SDC rate / text-head SDC rate (above 1: the text head is more "
        "reliable). ΔTop2Diff = text minus baseline mean golden Top2Diff, percentage points. "
        "The overall column uses each protocol's own definition of overall; the other "
        "definition (a campaign samples for its own definition, so the other can rest on few "
        "trials where the fault space is large):",
        "",
    ]
    for protocol in ("goldeneye", "bitstorm"):
        for c in facts["headline"][protocol]:
            if c["other"] and c["other"]["ratio"] is not None:
                other = next(r for r in OVERALL_NAMES if r != c["overall_rule"])
                lines.append(
                    f"- {protocol}, {c['kind']}: {_ratio(c['other'])} ({OVERALL_NAMES[other]})"
                )
    lines += [
        "",
        "## Models",
        "",
        "| Model | Head | Validation top-1 | Mean Top2Diff (validation) "
        "| goldeneye images | bitstorm images |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, m in facts["models"].items():
        lines.append(
            f"| {name} | {m['head']} | {100 * m['val_top1']:.2f}% | "
            f"{m['val_top2diff']:.2f}% | {m['images_goldeneye']} | {m['images_bitstorm']} |"
        )
    lines += ["", "## Where the difference comes from: the last layer", ""]
    lines += _by_bit_table(facts)
    lines += [
        "",
        "By the golden value's range (`value_before`: the weight for weight faults, the "
        "layer output for neuron faults), for the image's top-1 unit and for the others:",
        "",
    ]
    lines += _by_value_table(facts)
    lines += [
        "",
        "## Non-finite logits",
        "",
        "| Protocol | Model / faults | trials with a non-finite logit | SDC rate | share of "
        "SDCs that are non-finite |",
        "|---|---|---:|---:|---:|",
    ]
    for protocol in ("goldeneye", "bitstorm"):
        for key, v in sorted(facts["non_finite"][protocol].items()):
            share = (
                "n/a"
                if v["non_finite_share_of_sdc"] is None
                else f"{v['non_finite_share_of_sdc']:.1%}"
            )
            lines.append(
                f"| {protocol} | {key} | {v['non_finite_trials']:.3%} | {v['sdc']:.3%} | {share} |"
            )
    lines += ["", "## Which choice moves the answer", ""]
    lines += _ablation_lines(facts)
    lines += ["", "## Conclusion", "", *_conclusion(facts)]
    return "\n".join(lines) + "\n"


def _ratio(result: dict[str, Any] | None) -> str:
    if not result or result["ratio"] is None:
        return f"n/a ({(result or {}).get('missing', 'no comparison')})"
    return f"{result['ratio']:.2f}x [{result['low']:.2f}, {result['high']:.2f}]"


def _half_width(result: dict[str, Any] | None) -> str:
    if not result or result["ratio"] is None:
        return "n/a"
    return f"{(result['high'] - result['low']) / 2 / result['ratio']:.0%}"


def _rate(rate: dict[str, Any]) -> str:
    half = (rate["high"] - rate["low"]) / 2
    return f"{rate['rate']:.3%} ± {half:.3%}"


def _headline_row(protocol: str, c: dict[str, Any]) -> str:
    last = c["last_layer"]
    last_text = "n/a" if last["ratio"] is None else f"{last['ratio']:.2f}x"
    delta = "n/a" if c["delta_top2diff"] is None else f"{c['delta_top2diff']:+.2f} pp"
    return (
        f"| {protocol} | {c['kind']} | {last_text} | {_ratio(c['overall'])} | "
        f"{_half_width(c['overall'])} | {_rate(c['baseline']['overall'])} | "
        f"{_rate(c['text']['overall'])} | {delta} |"
    )


def _by_bit_table(facts: dict[str, Any]) -> list[str]:
    lines = [
        "SDC rate of the last layer by bit (exact; bits where no model and protocol saw an "
        "SDC are left out):",
        "",
    ]
    rows: dict[tuple[str, str, int], dict[str, str]] = {}
    columns = []
    for protocol in ("goldeneye", "bitstorm"):
        for r in facts["last_layer_by_bit"][protocol]:
            column = f"{protocol} {r['model'].split('_')[-1]}"
            if column not in columns:
                columns.append(column)
            rows.setdefault((r["kind"], int(r["bit"])), {})[column] = r["k"] / r["n"]
    lines += [
        "| Faults | Bit | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for (kind, bit), values in sorted(rows.items()):
        if not any(values.values()):
            continue
        cells = " | ".join(f"{values.get(c, 0):.3%}" for c in columns)
        lines.append(f"| {kind} | {bit} | {cells} |")
    return lines


def _by_value_table(facts: dict[str, Any]) -> list[str]:
    lines = [
        "| Protocol | Model | Faults | Unit | " + " | ".join(VALUE_RANGES) + " |",
        "|---|---|---|---|" + "---:|" * len(VALUE_RANGES),
    ]
    for protocol in ("goldeneye", "bitstorm"):
        cells: dict[tuple[str, str, bool], dict[int, str]] = {}
        for r in facts["last_layer_by_value"][protocol]:
            key = (r["model"], r["kind"], bool(r["top1"]))
            cells.setdefault(key, {})[int(r["value_range"])] = (
                f"{r['k'] / r['n']:.2%} ({int(r['n']):,})"
            )
        for (model, kind, top1), values in sorted(cells.items()):
            row = " | ".join(values.get(i, "") for i in range(len(VALUE_RANGES)))
            lines.append(
                f"| {protocol} | {model} | {kind} | {'top-1' if top1 else 'others'} | {row} |"
            )
    lines += [
        "",
        "Cells: SDC rate (trials). A blank cell: no site of that model has a golden "
        "value in that range.",
    ]
    return lines


def _ablation_lines(facts: dict[str, Any]) -> list[str]:
    ablations = facts.get("ablations") or {}
    if not ablations:
        return ["(ablations not run: --no-ablations)"]
    base = {c["kind"]: c for c in facts["headline"]["goldeneye"]}
    lines = [
        "goldeneye's protocol with one choice switched to bitstorm's; the overall "
        "improvement by goldeneye's definition (mean of per-layer rates) unless the choice "
        "is the definition itself:",
        "",
        "| Choice switched | weight faults | neuron faults |",
        "|---|---:|---:|",
        "| none (goldeneye) | "
        + " | ".join(_ratio(base[k]["overall"]) for k in ("weight", "neuron"))
        + " |",
    ]
    for label, rows in ablations.items():
        by_kind = {c["kind"]: c for c in rows}
        lines.append(
            f"| {label} | "
            + " | ".join(_ratio(by_kind[k]["overall"]) for k in ("weight", "neuron"))
            + " |"
        )
    lines.append(
        "| overall weighted by fault-space share | "
        + " | ".join(_ratio(base[k]["other"]) for k in ("weight", "neuron"))
        + " |"
    )
    return lines


def _verdict(result: dict[str, Any] | None) -> str:
    if not result or result["ratio"] is None:
        return "undefined"
    if result["low"] > 1:
        return "the text head is more reliable"
    if result["high"] < 1:
        return "the text head is less reliable"
    return "no difference the interval can tell"


def _conclusion(facts: dict[str, Any]) -> list[str]:
    holds = [
        f"{c['kind']} faults under {protocol}"
        for protocol in ("goldeneye", "bitstorm")
        for c in facts["headline"][protocol]
        if c["overall"]["ratio"] is not None and c["overall"]["low"] > 1
    ]
    encoder = facts.get("encoder", "the default's text encoder")
    lines = [
        f"- On digits with {encoder}, the paper's direction (the text head more reliable, "
        "overall, with an interval above 1) holds for "
        + (" and ".join(holds) if holds else "no fault kind under either protocol")
        + "; elsewhere the intervals include 1 or lie below it:"
    ]
    for protocol in ("goldeneye", "bitstorm"):
        for c in facts["headline"][protocol]:
            last = c["last_layer"]["ratio"]
            lines.append(
                f"- {protocol}, {c['kind']} faults: overall {_ratio(c['overall'])}: "
                f"{_verdict(c['overall'])}; last layer "
                + ("n/a" if last is None else f"{last:.2f}x")
                + "."
            )
    moves = _largest_move(facts)
    if moves:
        lines.append(
            f"- Of goldeneye's choices switched one at a time (each campaign sampled to the "
            f"margin), the one that moves the overall improvement most: {moves}. The definition "
            "of overall moves it too (the headline's second list), but a campaign sampled for "
            "one definition can leave the other too uncertain to rank."
        )
    lines.append(
        "- Scale: the paper reports 1.91x overall on ImageNet (1,000 classes); on 10 classes "
        "the bit arithmetic of docs/protocols.md expects a smaller advantage, since the top "
        "logit is 1 in 10 of the last layer's sites."
    )
    return lines


def _largest_move(facts: dict[str, Any]) -> str | None:
    """The ablation (each a campaign sampled to the margin) that moves the overall improvement
    most, by the log of the ratio of improvements."""
    ablations = facts.get("ablations") or {}
    base = {c["kind"]: c for c in facts["headline"]["goldeneye"]}
    moves = []
    for label, rows in ablations.items():
        for c in rows:
            a, b = c["overall"], base[c["kind"]]["overall"]
            if a["ratio"] and b["ratio"]:
                moves.append((abs(math.log(a["ratio"] / b["ratio"])), label, c["kind"], a, b))
    if not moves:
        return None
    _, label, kind, a, b = max(moves, key=lambda m: m[0])
    return f"{label} ({kind} faults: {b['ratio']:.2f}x -> {a['ratio']:.2f}x)"


if __name__ == "__main__":
    main()
