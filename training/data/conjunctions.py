"""Which conjunctions (image-visible trait AND text trait) each synthetic user prefers.

Two modes (`SynthConfig.preferences`, reasoning in `synthetic.py`'s module docstring):

- "mixed": 1-3 conjunctions a user, each on its own trait pair; a quarter use `category`.
- "crossed": exactly two conjunctions a user, crossed on one pair of an image-only trait and a text-only
  trait with both values different (red AND leather, blue AND cotton); `category` never appears.

A conjunction is a group of items: every item whose two traits hold the two values. Users are given
groups that match at least `MIN_SUPPORT` items where the catalog allows, so that events can pick them.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from numpy.typing import NDArray

from training.data.traits import COLUMN, VOCAB

PREFERENCE_MODES = ("mixed", "crossed")
PREF_A = ("colour", "pattern", "shape", "category")  # seen in the image
PREF_B = ("brand", "material", "price_band")  # only in the text
CROSSED_A = PREF_A[:3]  # image-only (category shows in the title); a prefix, so "ta" indexes both
MIN_SUPPORT = 3  # items a conjunction should match, when the catalog allows

Preferences = dict[str, NDArray[np.int64]]  # parallel arrays, one entry a conjunction (see `_result`)


def draw_preferences(rng: np.random.Generator, codes: NDArray[np.int64], n_users: int,
                     mode: str) -> Preferences:
    """Draw every user's conjunctions over the items' trait codes ((n_items, len(TRAITS)) into VOCAB).

    Returns:
        "owner" (user of each conjunction, users in order), "n_prefs" (per user), "ta"/"tb" (index into
        PREF_A/PREF_B), "va"/"vb" (index into VOCAB), "support" and "length" (items matching), "start"
        (first member's position in "members"), "members" (item rows grouped by conjunction).

    Raises:
        ValueError: an unknown mode, or a catalog too small to hold two crossed conjunctions.
    """
    if mode == "mixed":
        return _draw_mixed(rng, codes, n_users)
    if mode == "crossed":
        return _draw_crossed(rng, codes, n_users)
    raise ValueError(f"preferences={mode!r} must be one of {PREFERENCE_MODES}")


def preferences_frame(prefs: Preferences, user_ids: pl.Series) -> pl.DataFrame:
    """preferences.parquet: user_id, trait_a, value_a, trait_b, value_b, n_items; one conjunction a row."""
    ta, tb = prefs["ta"], prefs["tb"]
    value_a = [VOCAB[PREF_A[t]][v] for t, v in zip(ta.tolist(), prefs["va"].tolist(), strict=True)]
    value_b = [VOCAB[PREF_B[t]][v] for t, v in zip(tb.tolist(), prefs["vb"].tolist(), strict=True)]
    return pl.DataFrame({
        "user_id": user_ids.gather(prefs["owner"]),
        "trait_a": pl.Series(PREF_A, dtype=pl.String).gather(ta), "value_a": value_a,
        "trait_b": pl.Series(PREF_B, dtype=pl.String).gather(tb), "value_b": value_b,
        "n_items": prefs["support"],  # items matching the conjunction, cold ones included
    }, schema_overrides={"value_a": pl.String, "value_b": pl.String})


def _conjunction_groups(codes: NDArray[np.int64]) -> tuple[NDArray[np.int64], ...]:
    """Group items by every (image-visible value, text value) pair: (base, start, length, members).

    Group ``base[ia, ib] + va * len(VOCAB[PREF_B[ib]]) + vb`` holds the items with value va of PREF_A[ia]
    and vb of PREF_B[ib]: ``members[start[g]:start[g] + length[g]]``.
    """
    base = np.zeros((len(PREF_A), len(PREF_B)), np.int64)
    starts: list[NDArray[np.int64]] = []
    lengths: list[NDArray[np.int64]] = []
    members: list[NDArray[np.int64]] = []
    n_groups = 0
    for ia, a in enumerate(PREF_A):
        for ib, b in enumerate(PREF_B):
            key = codes[:, COLUMN[a]] * len(VOCAB[b]) + codes[:, COLUMN[b]]
            counts = np.bincount(key, minlength=len(VOCAB[a]) * len(VOCAB[b]))
            base[ia, ib] = n_groups
            starts.append(len(members) * len(codes) + np.cumsum(counts) - counts)
            lengths.append(counts)
            members.append(np.argsort(key, kind="stable"))
            n_groups += counts.size
    return base, np.concatenate(starts), np.concatenate(lengths), np.concatenate(members)


def _draw_mixed(rng: np.random.Generator, codes: NDArray[np.int64], n_users: int) -> Preferences:
    """Give each user 1-3 conjunctions (image-visible trait AND text-only trait) that real items satisfy."""
    base, start, length, members = _conjunction_groups(codes)
    n_prefs = rng.integers(1, 4, n_users)
    owner = np.repeat(np.arange(n_users), n_prefs)
    ta = np.where(rng.random(owner.size) < 0.25, PREF_A.index("category"), rng.integers(0, 3, owner.size))
    tb = rng.integers(0, len(PREF_B), owner.size)
    col_a, col_b = np.asarray([COLUMN[t] for t in PREF_A]), np.asarray([COLUMN[t] for t in PREF_B])
    size_b = np.asarray([len(VOCAB[t]) for t in PREF_B])
    group = np.zeros(owner.size, np.int64)
    todo = np.arange(owner.size)
    for _ in range(10):  # anchor on a random item; redraw while the conjunction matches too few items
        anchor = rng.integers(0, len(codes), todo.size)
        va, vb = codes[anchor, col_a[ta[todo]]], codes[anchor, col_b[tb[todo]]]
        group[todo] = base[ta[todo], tb[todo]] + va * size_b[tb[todo]] + vb
        todo = todo[length[group[todo]] < MIN_SUPPORT]
    first_member = members[start[group]]
    va, vb = codes[first_member, col_a[ta]], codes[first_member, col_b[tb]]
    return _result(owner, n_prefs, ta, tb, va, vb, group, (start, length, members))


def _draw_crossed(rng: np.random.Generator, codes: NDArray[np.int64], n_users: int) -> Preferences:
    """Give each user two conjunctions on one trait pair, both values different, drawn uniformly among
    the pairs of groups that match >= MIN_SUPPORT items (>= 1 where the catalog has no such pair)."""
    base, start, length, members = _conjunction_groups(codes)
    ta = rng.integers(0, len(CROSSED_A), n_users)
    tb = rng.integers(0, len(PREF_B), n_users)
    u = rng.random(n_users)
    first, second = np.zeros(n_users, np.int64), np.zeros(n_users, np.int64)  # cell within the pair's groups
    for ia, a in enumerate(CROSSED_A):
        for ib, b in enumerate(PREF_B):
            users = np.flatnonzero((ta == ia) & (tb == ib))
            counts = length[base[ia, ib]:base[ia, ib] + len(VOCAB[a]) * len(VOCAB[b])]
            pairs = _crossed_pairs(counts, len(VOCAB[b]))
            if not len(pairs[0]) and len(users):
                raise ValueError(f"no two items differ in both {a} and {b}; the catalog is too small "
                                 f"(n_items={len(codes)}) for crossed preferences")
            k = (u[users] * len(pairs[0])).astype(np.int64)
            first[users], second[users] = pairs[0][k], pairs[1][k]
    owner = np.repeat(np.arange(n_users), 2)
    cell = np.stack([first, second], axis=1).ravel()  # user 0's two, then user 1's, ...
    ta, tb = ta[owner], tb[owner]
    size_b = np.asarray([len(VOCAB[t]) for t in PREF_B])[tb]
    group = base[ta, tb] + cell
    return _result(owner, np.full(n_users, 2), ta, tb, cell // size_b, cell % size_b, group,
                   (start, length, members))


def _crossed_pairs(counts: NDArray[np.int64], size_b: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Ordered pairs of groups (cells va * size_b + vb) that differ in both values, all well supported."""
    pairs: tuple[NDArray[np.int64], NDArray[np.int64]] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for floor in (MIN_SUPPORT, 1):
        cells = np.flatnonzero(counts >= floor)
        va, vb = cells // size_b, cells % size_b
        i, j = np.nonzero((va[:, None] != va[None, :]) & (vb[:, None] != vb[None, :]))
        pairs = (cells[i], cells[j])
        if len(i):
            break
    return pairs


def _result(owner: NDArray[np.int64], n_prefs: NDArray[np.int64], ta: NDArray[np.int64],
            tb: NDArray[np.int64], va: NDArray[np.int64], vb: NDArray[np.int64], group: NDArray[np.int64],
            groups: tuple[NDArray[np.int64], ...]) -> Preferences:
    start, length, members = groups
    return {"owner": owner, "n_prefs": n_prefs, "ta": ta, "tb": tb, "support": length[group],
            "va": va, "vb": vb, "start": start[group], "length": length[group], "members": members}
