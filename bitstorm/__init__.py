"""Shared pieces of the bitstorm distribution.

The product lives in the top-level packages ``campaign``, ``trainers`` and ``embeddings``; this
package holds what they share: the version, the user-facing error types (:mod:`bitstorm.errors`),
typed config loading (:mod:`bitstorm.config`), atomic file writes (:mod:`bitstorm.atomic`) and
the classification metrics, Top2Diff and top-k (:mod:`bitstorm.metrics`).
"""

from importlib.metadata import PackageNotFoundError, version

from bitstorm.errors import BitstormError, ConfigError, DataError

try:
    __version__ = version("bitstorm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["BitstormError", "ConfigError", "DataError", "__version__"]
