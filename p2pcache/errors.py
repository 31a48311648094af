"""Error types a user or a peer can meet.

Every error carries a one-line message saying what went wrong, on which input, and what to do.
`P2PCacheError` is the base of everything the CLI reports as a clean one-line error; anything else
escaping is a bug.
"""

from __future__ import annotations


class P2PCacheError(Exception):
    """Base class: an error with a one-line, user-facing message and an exit code."""

    exit_code = 1


class InvalidInput(P2PCacheError, ValueError):
    """Malformed input from a user or a peer (a key, a CID, a block, a file format)."""

    exit_code = 2


class InvalidCID(InvalidInput):
    pass


class InvalidKey(InvalidInput):
    pass


class MalformedBlock(InvalidInput):
    """A block's bytes do not decode as what its CID or context says they are."""


class NotFound(P2PCacheError, KeyError):
    exit_code = 3

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class OriginError(NotFound):
    """An origin (a registry URL, an index page) answered something other than the file, or not at all."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class CorruptData(P2PCacheError):
    """Bytes on disk or from a peer do not match the hash that names them."""

    exit_code = 4


class RepoError(P2PCacheError):
    exit_code = 5


class RepoLocked(RepoError):
    pass


class DiskFull(RepoError):
    exit_code = 6


def leaf_error(e: BaseException) -> BaseException:
    """The error to report from `e`, which trio may have wrapped in (nested) exception groups: a
    `DiskFull` anywhere in it wins (it is what the user must act on), then the first of our own errors,
    then the first leaf of any kind."""
    leaves: list[BaseException] = []

    def walk(x: BaseException) -> None:
        if isinstance(x, BaseExceptionGroup):
            for sub in x.exceptions:
                walk(sub)
        else:
            leaves.append(x)

    walk(e)
    for want in (DiskFull, P2PCacheError):
        for leaf in leaves:
            if isinstance(leaf, want):
                return leaf
    return leaves[0] if leaves else e
