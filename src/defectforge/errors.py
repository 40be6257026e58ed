"""One exception type for every user-facing failure.

The command line catches :class:`DefectforgeError`, prints its message as a single
line prefixed with ``error:`` and exits with status 2. Messages always name the file
or the params key at fault.
"""

import errno


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


class OutputError(DefectforgeError):
    """An output that cannot be written (disk full, file too large) or is in use by another run."""


# errno values that mean "the device or quota has no room for what is written": every writer
# (PNG, Parquet, JSON) fails with one of them when the disk fills, wherever it is in a stage
NO_ROOM = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n))


def no_room(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of room (disk full, file too large, quota)."""
    return isinstance(exc, OSError) and exc.errno in NO_ROOM


class writing:
    """``with writing(out, "generate output", hint):`` turns a write that failed for lack of room
    into one :class:`OutputError` line naming ``out`` and what to do (``hint``); other errors pass.

    Used around a whole stage's writes, so a full disk is reported the same way whichever
    writer (image, mask, manifest shard, JSON) hit it first.
    """

    def __init__(self, out, what: str, hint: str = ""):
        self.out, self.what, self.hint = out, what, hint

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and no_room(exc):
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            reason = exc.strerror or str(exc)
            hint = f"; {self.hint}" if self.hint else ""
            raise OutputError(f"{self.out}: writing the {self.what} failed: {reason}{where}{hint}") from None
        return False
