"""One exception type for every user-facing failure.

The command line catches :class:`DefectforgeError`, prints its message as a single
line prefixed with ``error:`` and exits with status 2. Messages always name the file
or the params key at fault.
"""


class DefectforgeError(Exception):
    """A failure caused by the user's input (file, folder, params key)."""

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


class ParamsError(DefectforgeError):
    """An unknown, mistyped or out-of-range key in params.yaml."""


class DataError(DefectforgeError):
    """An unreadable image, a bad mask, an empty or unknown dataset layout."""


class ManifestError(DefectforgeError):
    """A manifest that fails its schema, its paths or its expectation suite."""
