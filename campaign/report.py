"""Campaign reports: SDC rates with intervals per model, layer and bit, the baseline-vs-text
comparison (the paper's "improvement in reliability") and plots, as Markdown, HTML and JSON.

    bitstorm report CAMPAIGN_DIR [--compare OTHER_CAMPAIGN_DIR] [--out DIR]
        [--confidence 0.95] [--interval wilson|cp] [--bootstrap N]

The command line only: the numbers are built in campaign.analysis.build and written out by
campaign.analysis.output, which need neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.fs as pafs

from bitstorm.command import command_parser, run_command
from campaign.analysis.build import build_report
from campaign.analysis.document import to_markdown
from campaign.analysis.output import write_report
from campaign.analysis.render import comparison_blocks
from campaign.analysis.summary import INTERVALS, CampaignReport, Options


def default_out(campaign: CampaignReport) -> Path:
    """``<campaign>/report`` for a local campaign; ``./<campaign>-report`` for a URI."""
    if isinstance(campaign.store.filesystem, pafs.LocalFileSystem):
        return Path(campaign.store.root) / "report"
    return Path(f"{campaign.name}-report")


def build_parser(prog: str = "python -m campaign.report") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        "SDC rates, baseline-vs-text improvement and plots of a campaign, as report.md, "
        "report.html and report.json.",
        examples=(
            "bitstorm report bitstorm-default/campaigns/digits_goldeneye",
            "bitstorm report results/imagenet_text --compare results/imagenet_linear --out rep/",
            "bitstorm report s3://bucket/bitstorm/imagenet_text --interval cp --bootstrap 4000",
        ),
    )
    parser.add_argument("campaign", metavar="CAMPAIGN_DIR", help="a campaign folder or URI")
    parser.add_argument(
        "--compare",
        metavar="OTHER_CAMPAIGN_DIR",
        help="a second campaign whose models join the report and the baseline-vs-text pairing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: CAMPAIGN_DIR/report, or ./<campaign>-report for a URI)",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        help="interval level (default: the campaign spec's confidence, 0.95 unless it set one)",
    )
    parser.add_argument(
        "--interval",
        choices=list(INTERVALS),
        default="wilson",
        help="interval of a rate that rests on one stratum (default: wilson)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="also give bootstrap intervals of the improvement ratios, with N resamples",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m campaign.report") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(args, lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    locations = [args.campaign] + ([args.compare] if args.compare else [])
    options = Options(args.confidence, args.interval, args.bootstrap)
    report = build_report(locations, options)
    written = write_report(report, args.out or default_out(report.campaigns[0]))
    for path in written:
        print(f"wrote {path}")
    print()
    print(to_markdown(comparison_blocks(report)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
