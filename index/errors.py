"""Domain errors of the index layer."""

from __future__ import annotations


class IndexLayerError(Exception):
    """Base class of every error the index layer raises on purpose."""


class IndexVerificationError(IndexLayerError):
    """A published index directory is missing a file, or a file differs from its manifest."""


class IndexProbeError(IndexVerificationError):
    """A published version could not be read and searched in a probe process (`index.probe`): the reader
    crashed, ran out of memory or time, or found the files inconsistent. The message names the file."""


class CorruptLogError(IndexLayerError):
    """The write log holds a damaged frame before its end (not a torn tail)."""


class UnknownItemError(IndexLayerError, KeyError):
    """An item id that the index does not hold."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class ReembedError(IndexLayerError, ValueError):
    """Log records were written under another model version and cannot be re-embedded."""


class LogRewrittenError(IndexLayerError):
    """The write log was truncated by another process after this one read it."""
