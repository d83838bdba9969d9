"""The installed distribution's version, in a module of its own so that the project's modules
can read it without importing the ``bitstorm`` package (whose ``__init__`` reaches the notebook
API lazily)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bitstorm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
