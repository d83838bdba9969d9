"""bitstorm's log lines: one logger tree, ``bitstorm``, with its own level and handler.

Why: Ray's logging config sets the *root* logger of the driver and of every worker to its own
level (bitstorm asks Ray for ERROR, to keep Ray Train's per-report lines out of a user's
console), which would silence every bitstorm INFO and WARNING line that relies on the root. A
level and a handler on ``bitstorm`` itself survive that, in the driver and in the actors (whose
output Ray echoes to the driver), and ``-v``/``-q`` set how much a user sees.
"""

from __future__ import annotations

import logging
import sys

ROOT = "bitstorm"
# -q, the default, -v: what each verbosity shows
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def get_logger(module: str) -> logging.Logger:
    """The logger of ``module`` (its ``__name__``) inside bitstorm's tree, whichever package of
    the distribution (campaign, trainers, embeddings) it is in."""
    return logging.getLogger(module if module.startswith(ROOT) else f"{ROOT}.{module}")


class _Lines(logging.Formatter):
    """INFO as the bare message; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def configure(verbosity: int = 0) -> None:
    """Show bitstorm's lines at ``verbosity`` (-1 quiet: warnings; 0: progress; 1: debug) on
    stderr, and only there: a command owns its terminal, and a library that calls
    ``logging.error`` first (open_clip does) gives the root logger a handler that would print
    every line twice. Idempotent: a second call only changes the level. Without this call (a
    notebook, a script of the user's) bitstorm's records go to the root logger as usual."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    logger.propagate = False
    if not any(isinstance(h.formatter, _Lines) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Lines("%(message)s"))
        logger.addHandler(handler)
