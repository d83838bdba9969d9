"""What every bitstorm command shares: its parser's ``-v``/``-q`` and help layout, and its exit
codes: 0 done, 2 bad input (one ``error:`` line that names the problem and the fix, never a
traceback), 1 a failure of the work itself.

Why one piece: a user moving between ``bitstorm run``, ``train`` and ``report`` should meet the
same flags, the same messages and the same codes, and scripts can test the codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from bitstorm.errors import BitstormError
from bitstorm.logs import configure

DONE, FAILED, BAD_INPUT = 0, 1, 2


def command_parser(
    prog: str,
    description: str,
    *,
    fields: type | None = None,
    examples: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A parser whose ``--help`` ends with the config ``fields`` (a dataclass: the keys that
    ``key=value`` overrides and YAML files take) and ``examples``, with ``-v``/``-q``."""
    epilog = []
    if fields is not None:
        names = [f.name for f in dataclasses.fields(fields) if f.init]
        epilog.append("fields (key=value; a dotted key sets a nested one, resources.actors=4):")
        epilog += _wrapped(", ".join(names))
    if examples:
        epilog.append("examples:")
        epilog += [f"  {example}" for example in examples]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="\n".join(epilog) or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail (debug lines)"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="warnings and results only"
    )
    return parser


def run_command(args: argparse.Namespace, work: Callable[[], int]) -> int:
    """``work()``'s exit code, with bitstorm's log lines at the asked verbosity; a bad input
    becomes one ``error:`` line on stderr and exit code 2."""
    configure(args.verbose - args.quiet)
    try:
        return work()
    except BitstormError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT


def _wrapped(text: str, width: int = 92) -> list[str]:
    lines, line = [], " "
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = " "
        line += f" {word}"
    return [*lines, line]
