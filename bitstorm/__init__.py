"""Shared pieces of the bitstorm distribution: its version and the user-facing error types.

The product lives in the top-level packages ``campaign``, ``trainers`` and ``embeddings``; this
package holds only what all three must agree on.
"""

from importlib.metadata import PackageNotFoundError, version

from bitstorm.errors import BitstormError, ConfigError, DataError

try:
    __version__ = version("bitstorm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["BitstormError", "ConfigError", "DataError", "__version__"]
