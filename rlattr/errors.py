"""The one base every public rlattr failure derives from.

``RlattrError`` subclasses ``ValueError`` so that callers written against the earlier
``except ValueError`` keep working; the ``rlattr`` command catches it and prints one line.
Messages follow one format: ``"arg: got X; supported: Y"``.
"""

from __future__ import annotations


class RlattrError(ValueError):
    """A failure rlattr reports to its user: bad input, a missing or unreadable file, a bad config."""


class StoreError(RlattrError):
    """A stored file is missing, corrupt, of an unknown format version, or fails its checksum."""


class ConfigError(RlattrError):
    """A run configuration (YAML or keyword arguments) holds an unknown key or a bad value."""


class MissingError(StoreError, KeyError):
    """A round, record id or file that a run does not hold (never scored, or pruned by retention).

    Also a ``KeyError`` so that lookups by id can be caught the mapping way.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class RunExistsError(StoreError, FileExistsError):
    """A run folder that already holds a run: rlattr never overwrites one silently."""

    def __str__(self) -> str:  # OSError's form needs errno and filename
        return Exception.__str__(self)


def check_int(name: str, value: object, low: int = 1, *, allow_none: bool = False) -> None:
    """Raise :class:`RlattrError` unless ``value`` is an int ``>= low`` (bools are not ints here)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RlattrError(
            f"{name}: expected an integer >= {low}{' or None' if allow_none else ''}, got {value!r}"
        )


__all__ = ["ConfigError", "MissingError", "RlattrError", "RunExistsError", "StoreError", "check_int"]
