"""Shared pieces of the bitstorm distribution.

The product lives in the top-level packages ``campaign``, ``trainers`` and ``embeddings``; this
package holds what they share: the version, the user-facing error types (:mod:`bitstorm.errors`),
typed config loading (:mod:`bitstorm.config`), atomic file writes (:mod:`bitstorm.atomic`) and
the classification metrics, Top2Diff and top-k (:mod:`bitstorm.metrics`); and the notebook API,
``bitstorm.run_campaign`` and ``bitstorm.compare`` (:mod:`campaign.api`).
"""

from bitstorm.errors import BitstormError, ConfigError, DataError
from bitstorm.version import __version__

__all__ = ["BitstormError", "ConfigError", "DataError", "__version__", "compare", "run_campaign"]


def __getattr__(name: str):
    """``bitstorm.run_campaign`` and ``bitstorm.compare`` (campaign.api), imported on first use:
    they pull in torch and the campaign packages, which the shared pieces here must not."""
    if name in ("run_campaign", "compare", "CampaignResult"):
        from campaign import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitstorm' has no attribute {name!r}")
