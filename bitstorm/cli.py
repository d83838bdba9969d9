"""``bitstorm``: one command with a subcommand for every job. Each subcommand is the same
program as its ``python -m`` / ``campaign/run.py`` form (same flags, messages and exit codes,
bitstorm.command); this module only dispatches, so ``bitstorm --help`` imports neither torch
nor Ray."""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass

from bitstorm.command import BAD_INPUT
from bitstorm.version import __version__


@dataclass(frozen=True)
class Subcommand:
    module: str
    function: str
    summary: str


SUBCOMMANDS = {
    "run": Subcommand("campaign.cli", "main", "run a fault-injection campaign (or the default)"),
    "report": Subcommand("campaign.report", "main", "rates, intervals, comparison and plots"),
    "sites": Subcommand("campaign.cli", "sites_main", "print a model's fault-site space"),
    "train": Subcommand("trainers.train", "main", "train a model with Ray Train"),
    "tune": Subcommand("trainers.tune", "main", "sweep head initialisations with Ray Tune"),
    "embeddings": Subcommand("embeddings.cli", "main", "build, show or import class embeddings"),
}


def overview() -> str:
    lines = [
        f"usage: bitstorm {{{','.join(SUBCOMMANDS)}}} ... [-h] [-v] [-q]",
        "",
        "Measure how resilient image classifiers are to transient bit flips, and whether "
        "text-guided heads help.",
        "",
        "subcommands (bitstorm SUBCOMMAND --help for each one's flags, fields and examples):",
    ]
    lines += [f"  {name:<12}{command.summary}" for name, command in SUBCOMMANDS.items()]
    lines += ["", "exit codes: 0 done, 2 bad input (one error line), 1 the work failed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(overview())
        print("error: name a subcommand, e.g. bitstorm run", file=sys.stderr)
        return BAD_INPUT
    if argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    if argv[0] == "--version":
        print(f"bitstorm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        print(
            f"error: no subcommand {name!r}; {hint}choose one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return BAD_INPUT
    command = SUBCOMMANDS[name]
    function = getattr(importlib.import_module(command.module), command.function)
    return function(rest, prog=f"bitstorm {name}")
