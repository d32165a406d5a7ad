"""The refresh job's holdout: items that neither the champion nor the candidate trained on.

Rule: the cold-start protocol scores held-out *items*, so the held-out items are drawn only from the items
that are new since the champion was trained (absent from the interactions it recorded at registration,
lineage.py); the candidate trains on every other event. As many items are held out as `fraction` of all
items would give, or every new item when there are fewer. A given holdout file is checked the same way:
events on items the champion trained on are dropped.

When no such item exists (nothing new, or a champion registered without its training data) there is no fair
comparison: the refresh refuses, unless forced, when it falls back to a random holdout and says loudly that
the champion's numbers are warm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from training.evaluation.split import split_holdout_items

logger = logging.getLogger(__name__)


class NoFairHoldout(ValueError):
    """No item can be held out that the champion did not train on."""


@dataclass(frozen=True)
class Holdout:
    """The candidate's training interactions, the held-out events, and which holdout it was."""

    train: pl.DataFrame
    holdout: pl.DataFrame
    description: str  # for the refresh summary
    fair: bool  # False: a forced fallback on items the champion trained on


def _item_ids(frame: pl.DataFrame) -> set[str]:
    return set(frame["item_id"].cast(pl.String).to_list())


def _on(items: set[str] | list[str]) -> pl.Expr:
    return pl.col("item_id").cast(pl.String).is_in(pl.Series(list(items), dtype=pl.String).implode())


def new_items_holdout(interactions: pl.DataFrame, seen: set[str] | None, fraction: float, seed: int,
                      champion: str) -> Holdout:
    """Hold out (all events of) items absent from the champion's training interactions `seen`.

    Raises:
        NoFairHoldout: `seen` is unrecorded, or every item in `interactions` is in it.
    """
    if seen is None:
        raise NoFairHoldout(f"champion version {champion} has no record of what it trained on (registered without "
                            "its interactions), so no item is known to be new to it")
    items = sorted(_item_ids(interactions))
    new = sorted(set(items) - seen)
    if not new:
        raise NoFairHoldout(f"none of the {len(items)} items in the interactions is new since champion version "
                            f"{champion} was trained: nothing that neither model saw is left to hold out")
    n = min(len(new), max(1, round(fraction * len(items))))
    if n >= len(items):
        raise ValueError(f"holding out {n} of {len(items)} items leaves nothing to fine-tune on")
    cold = list(np.random.default_rng(seed).permutation(new)[:n])
    return Holdout(interactions.filter(~_on(cold)), interactions.filter(_on(cold)),
                   f"{n} of the {len(new)} items new since version {champion} was trained "
                   f"(none in its training interactions)", fair=True)


def given_holdout(interactions: pl.DataFrame, given: pl.DataFrame, seen: set[str] | None, champion: str) -> Holdout:
    """A given holdout file, less its events on items the champion trained on (when that is recorded).

    Raises:
        NoFairHoldout: the champion trained on every item of the file.
    """
    if seen is None:
        return Holdout(interactions, given, f"given file, {len(_item_ids(given))} items (not checked: version "
                       f"{champion} recorded no training interactions)", fair=True)
    warm = _item_ids(given) & seen
    kept = given.filter(~_on(warm))
    if kept.is_empty():
        raise NoFairHoldout(f"champion version {champion} trained on every item of the given holdout")
    dropped = f"; {len(warm)} items dropped: version {champion} trained on them" if warm else ""
    return Holdout(interactions, kept, f"given file, {len(_item_ids(kept))} items{dropped}", fair=True)


def choose_holdout(interactions: pl.DataFrame, given: pl.DataFrame | None, seen: set[str] | None, fraction: float,
                   seed: int, champion: str, force: bool) -> Holdout:
    """The refresh's holdout by the rule in the module docstring.

    Raises:
        NoFairHoldout: there is no fair holdout and `force` is off (the message says what to do).
    """
    try:
        if given is not None:
            return given_holdout(interactions, given, seen, champion)
        return new_items_holdout(interactions, seen, fraction, seed, champion)
    except NoFairHoldout as e:
        if not force:
            raise NoFairHoldout(f"{e}; refusing to judge the champion on items it trained on: pass --holdout FILE "
                                "with events on items it never saw, or --force to promote on a warm holdout") from e
        reason = str(e)
        logger.warning("WARM HOLDOUT: %s; --force: the champion is scored on items it trained on", reason)
    if given is not None:
        train, holdout = interactions, given
    else:
        train, holdout = split_holdout_items(interactions, fraction, seed)
    return Holdout(train, holdout, f"WARM for the champion ({reason}); forced, not a fair comparison", fair=False)
