"""Errors a user can cause and fix. Internal bugs stay assertions.

Every message says what was wrong and what to pass instead, so a user never has to read our code
to recover. Both classes subclass ``ValueError`` so generic callers can still catch them.
"""


class BitstormError(ValueError):
    """Base of every error bitstorm raises for bad input."""


class ConfigError(BitstormError):
    """An argument, option or spec field is invalid (unknown name, out of range, missing)."""


class DataError(BitstormError):
    """Input data or a file is invalid (wrong dtype, non-finite values, shape mismatch)."""
