"""Domain errors of the encoder: bad item content, named by field and stable reason."""

from __future__ import annotations


class InvalidItemError(ValueError):
    """An item the encoder cannot read.

    Attributes:
        reason: stable machine-readable reason, e.g. ``image_undecodable``.
        field: the offending field relative to the item, e.g. ``images[0]``.
        item_index: position of the item in the batch, when known.
    """

    def __init__(self, reason: str, field: str, detail: str, item_index: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        self.item_index = item_index
        super().__init__(f"{reason}: {self.path()} {detail}")

    def path(self, prefix: str = "items") -> str:
        """Field path like ``items[3].images[0]``."""
        where = f"{prefix}[{self.item_index}]" if self.item_index is not None else prefix
        return f"{where}.{self.field}" if self.field else where

    def at(self, item_index: int) -> InvalidItemError:
        """The same error, located at a batch position."""
        return InvalidItemError(self.reason, self.field, self.detail, item_index)


class PretrainedUnavailable(ImportError):
    """A package holding pretrained weights is not installed; the message says which and how to install it."""
