"""Synthetic catalog, rendered images and interactions whose ground truth needs both modalities.

Colour, pattern and shape show only in the image; brand, material and price band only in the text;
category in both. Users prefer conjunctions of an image-visible trait and a text-only trait (red AND
leather), which a sum of per-modality vectors cannot express. Everything is drawn from generators
seeded by ``SynthConfig.seed``, so one config gives identical frames and pixels.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from numpy.typing import NDArray

from training.data.catalog import EVENT_WEIGHTS
from training.data.render import write_images
from training.data.traits import COLOUR_RGB, COLUMN, TRAIT_KINDS, TRAITS, VOCAB

logger = logging.getLogger(__name__)

# words that would leak an image-only trait into the text, typos included
FORBIDDEN_WORDS = frozenset(
    [w for t, k in TRAIT_KINDS.items() if k == "image" for w in VOCAB[t]]
    + ["stripe", "striped", "dot", "dotted", "check", "checked", "checkered", "round", "colour", "color"]
)

_TRAITS, _COL = TRAITS, COLUMN
_PREF_A = ("colour", "pattern", "shape", "category")  # seen in the image
_PREF_B = ("brand", "material", "price_band")  # only in the text
_PREF_SHARE = 0.8  # share of a user's events that pick an item satisfying one of their conjunctions
_MIN_SUPPORT = 3  # items a conjunction should match, when the catalog allows
_EVENT_P = {True: (0.45, 0.3, 0.15, 0.1), False: (0.75, 0.17, 0.05, 0.03)}  # by "satisfies a preference"
_T0_US = 1_704_067_200 * 10**6  # 2024-01-01T00:00:00Z
_DAY_US = 86_400 * 10**6
_TITLES = ("{brand} {material} {category}", "{material} {category} by {brand}",
           "{brand} {category} in {material}", "{category}, {material} - {brand}")
_PRICE = {
    "budget": ("A budget pick.", "Great value for everyday use.", "Priced to be affordable."),
    "mid": ("Fairly priced.", "Mid-range and dependable.", "Good value for money."),
    "premium": ("Premium quality.", "An upmarket finish.", "Premium craftsmanship throughout."),
    "luxury": ("A luxury piece.", "Exclusive luxury finish.", "Pure indulgence, no compromise."),
}
_MATERIAL = ("Made of {material}.", "Crafted in {material} by {brand}.", "The {material} ages well.")
_FILLER = ("Ships within two days.", "Easy to care for.", "Made to last.", "Designed in our studio.",
           "Packed in recyclable paper.", "A dependable everyday companion.")


@dataclass(frozen=True)
class SynthConfig:
    """Size, seed and noise of a synthetic dataset."""

    n_items: int = 2000
    n_users: int = 500
    seed: int = 0
    image_size: int = 64  # rendered PNG side in pixels
    missing_image_rate: float = 0.1  # share of items with no image
    missing_text_rate: float = 0.1  # share with title "" and description null; never both missing
    cold_start_rate: float = 0.1  # share of items held out: no training interactions
    events_per_user: tuple[int, int] = (8, 30)  # inclusive range
    noise: float = 0.1  # strength of typos, crops, rotations, background clutter, 0..1
    write_images: bool = True  # False: image_paths are still filled in, but no PNG is written

    def __post_init__(self) -> None:
        object.__setattr__(self, "events_per_user", tuple(self.events_per_user))
        lo, hi = ((*self.events_per_user, 0, 0))[:2]
        checks = [
            (self.n_items >= 10, f"n_items={self.n_items} must be >= 10"),
            (self.n_users >= 1, f"n_users={self.n_users} must be >= 1"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
            (16 <= self.image_size <= 1024, f"image_size={self.image_size} must be in [16, 1024]"),
            *[(0 <= getattr(self, f) < 1, f"{f}={getattr(self, f)} must be in [0, 1)")
              for f in ("missing_image_rate", "missing_text_rate", "cold_start_rate")],
            (self.missing_image_rate + self.missing_text_rate < 1,
             f"missing rates sum to {self.missing_image_rate + self.missing_text_rate}; must be < 1"),
            (len(self.events_per_user) == 2 and 1 <= lo <= hi,
             f"events_per_user={self.events_per_user} must be (low, high) with 1 <= low <= high"),
            (0 <= self.noise <= 1, f"noise={self.noise} must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Catalogs of `onetower evaluate --preset NAME`. Both modalities carry signal the other lacks: users like
# conjunctions of an image-side trait (colour, pattern, shape: image only; category: both) and a text-only
# one (brand, material, price band), 10% of items lack their image and 10% their text, 10% are cold.
PRESETS: dict[str, SynthConfig] = {
    "small": SynthConfig(n_items=1000, n_users=600, seed=0),
    "medium": SynthConfig(n_items=5000, n_users=3000, seed=0),
    "tiny": SynthConfig(n_items=200, n_users=80, image_size=32, seed=2),  # tests: the same command in seconds
}


@dataclass(frozen=True)
class SynthDataset:
    """Paths of a generated dataset; all files lie under ``root``."""

    root: Path
    catalog: Path  # root/catalog.parquet
    interactions: Path  # root/interactions.parquet: training events, never on cold-start items
    holdout_interactions: Path  # root/interactions_holdout.parquet: events on cold-start items only
    traits: Path  # root/traits.parquet: ground truth per item
    preferences: Path  # root/preferences.parquet: ground truth per user, one conjunction a row
    meta: Path  # root/meta.json: config, vocabularies, trait kinds

    @classmethod
    def at(cls, root: Path) -> SynthDataset:
        """Name the files of a dataset generated into ``root``."""
        root = Path(root)
        return cls(root, root / "catalog.parquet", root / "interactions.parquet",
                   root / "interactions_holdout.parquet", root / "traits.parquet",
                   root / "preferences.parquet", root / "meta.json")


@dataclass(frozen=True)
class _Items:
    codes: NDArray[np.int64]  # (n_items, len(_TRAITS)) index into VOCAB per trait
    has_image: NDArray[np.bool_]
    has_text: NDArray[np.bool_]
    is_cold: NDArray[np.bool_]
    popularity: NDArray[np.float64]  # sums to 1, Zipf-like


def generate(out_dir: Path, config: SynthConfig = SynthConfig(),
             progress: Callable[[int], None] | None = None) -> SynthDataset:
    """Write catalog, images, interactions and ground truth under ``out_dir``.

    Args:
        progress: called with the number of items just finished, once per render chunk.
    """
    ds = SynthDataset.at(out_dir)
    ds.root.mkdir(parents=True, exist_ok=True)
    items = _draw_items(np.random.default_rng([config.seed, 0]), config)
    item_ids = _ids("item", config.n_items)
    catalog = _catalog_frame(np.random.default_rng([config.seed, 1]), items, item_ids, config.noise)
    catalog.write_parquet(ds.catalog)
    _traits_frame(items, item_ids).write_parquet(ds.traits)
    rng = np.random.default_rng([config.seed, 2])
    prefs = _draw_preferences(rng, items, config.n_users)
    events = _draw_events(rng, items, prefs, config)
    user_ids = _ids("user", config.n_users)
    _preferences_frame(prefs, user_ids).write_parquet(ds.preferences)
    events = events.with_columns(user_id=user_ids.gather(events["user"]),
                                 item_id=item_ids.gather(events["item"]))
    cold = pl.Series(items.is_cold).gather(events["item"])
    columns = ["user_id", "item_id", "ts", "event", "weight"]
    events.filter(~cold).select(columns).write_parquet(ds.interactions)
    events.filter(cold).select(columns).write_parquet(ds.holdout_interactions)
    write_images(ds.root / "images" if config.write_images else None, items.codes, items.has_image, item_ids,
                 config.image_size, config.noise, config.seed, progress)
    meta = {"config": asdict(config), "trait_kinds": TRAIT_KINDS, "vocab": VOCAB,
            "colour_rgb": COLOUR_RGB, "event_weights": EVENT_WEIGHTS}
    ds.meta.write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("synthetic dataset: %d items (%d cold), %d users, %d training and %d holdout events in %s",
                config.n_items, int(items.is_cold.sum()), config.n_users, int((~cold).sum()),
                int(cold.sum()), ds.root)
    return ds


def load_traits(path: Path) -> pl.DataFrame:
    """Read the per-item ground truth from traits.parquet or from a dataset directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "traits.parquet"
    frame = pl.read_parquet(path)
    expected = ["item_id", *_TRAITS, "has_image", "has_text", "is_cold", "popularity"]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; expected {expected}")
    return frame


def _ids(prefix: str, n: int) -> pl.Series:
    width = max(6, len(str(n - 1)))
    digits = pl.int_range(0, n, eager=True).cast(pl.String).str.zfill(width)
    return (prefix + "-" + digits).alias(f"{prefix}_id")


def _utc(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _draw_items(rng: np.random.Generator, config: SynthConfig) -> _Items:
    n = config.n_items
    codes = np.stack([rng.integers(0, len(VOCAB[t]), n) for t in _TRAITS], axis=1)
    order = rng.permutation(n)
    n_no_image, n_no_text = round(config.missing_image_rate * n), round(config.missing_text_rate * n)
    has_image, has_text = np.ones(n, bool), np.ones(n, bool)
    has_image[order[:n_no_image]] = False
    has_text[order[n_no_image:n_no_image + n_no_text]] = False
    is_cold = np.zeros(n, bool)
    is_cold[rng.permutation(n)[:round(config.cold_start_rate * n)]] = True
    popularity = (rng.permutation(n) + 1.0) ** -0.9
    return _Items(codes, has_image, has_text, is_cold, popularity / popularity.sum())


def _values(items: _Items, trait: str) -> NDArray[np.str_]:
    return np.asarray(VOCAB[trait])[items.codes[:, _COL[trait]]]


def _catalog_frame(rng: np.random.Generator, items: _Items, item_ids: pl.Series,
                   noise: float) -> pl.DataFrame:
    titles, descriptions = _texts(rng, items, noise)
    n = len(items.has_text)
    attributes = np.asarray([json.dumps({"category": c}) for c in VOCAB["category"]])
    updated = _T0_US - rng.integers(0, 30 * _DAY_US, n)
    return pl.DataFrame({
        "item_id": item_ids,
        "title": pl.Series(titles, dtype=pl.String),
        "description": pl.Series(descriptions, dtype=pl.String),
        # attributes are text, so an item without text has none
        "attributes": np.where(items.has_text, attributes[items.codes[:, _COL["category"]]], "{}"),
        "image_paths": pl.Series(items.has_image),
        "updated_at": updated,
    }).with_columns(
        updated_at=_utc("updated_at"),
        image_paths=pl.when("image_paths").then(pl.concat_list(pl.format("images/{}.png", "item_id"))),
    )


def _texts(rng: np.random.Generator, items: _Items, noise: float) -> tuple[list[str], list[str | None]]:
    n = len(items.has_text)
    brand, material, category = (_values(items, t).tolist() for t in ("brand", "material", "category"))
    price = _values(items, "price_band").tolist()
    picks = rng.integers(0, 1 << 30, (n, 5))  # title template, price phrase, material phrase, filler, order
    n_typos = rng.binomial(3, noise * 0.5, (n, 2))
    typo_u = rng.random((n, 2, 3, 3))  # (item, field, typo, [word, operation, position])
    titles: list[str] = []
    descriptions: list[str | None] = []
    for i in range(n):
        if not items.has_text[i]:
            titles.append("")
            descriptions.append(None)
            continue
        words = {"brand": brand[i], "material": material[i], "category": category[i]}
        title = _TITLES[picks[i, 0] % len(_TITLES)].format(**words)
        if picks[i, 4] % 2:
            title = title[0].upper() + title[1:]
        parts = [_PRICE[price[i]][picks[i, 1] % 3], _MATERIAL[picks[i, 2] % 3].format(**words),
                 _FILLER[picks[i, 3] % len(_FILLER)]]
        description = " ".join(parts[::-1] if picks[i, 4] % 3 == 0 else parts)
        titles.append(_typos(title, n_typos[i, 0], typo_u[i, 0]))
        descriptions.append(_typos(description, n_typos[i, 1], typo_u[i, 1]))
    return titles, descriptions


def _typos(text: str, count: int, draws: NDArray[np.float64]) -> str:
    """Swap or drop a character in ``count`` words, never making a word that names an image trait."""
    words = text.split(" ")
    for word_u, op_u, pos_u in draws[:count]:
        j = int(word_u * len(words))
        word = words[j]
        if len(word) < 4:
            continue
        k = int(pos_u * (len(word) - 1))
        typo = word[:k] + word[k + 1] + word[k] + word[k + 2:] if op_u < 0.5 else word[:k] + word[k + 1:]
        if not FORBIDDEN_WORDS.intersection(re.findall(r"[a-z]+", typo.lower())):
            words[j] = typo
    return " ".join(words)


def _traits_frame(items: _Items, item_ids: pl.Series) -> pl.DataFrame:
    columns = {t: pl.Series(t, _values(items, t), dtype=pl.String) for t in _TRAITS}
    flags = {"has_image": items.has_image, "has_text": items.has_text, "is_cold": items.is_cold}
    return pl.DataFrame({"item_id": item_ids, **columns, **flags, "popularity": items.popularity})


def _conjunction_groups(codes: NDArray[np.int64]) -> tuple[NDArray[np.int64], ...]:
    """Group items by every (image-visible value, text value) pair: (base, start, length, members)."""
    base = np.zeros((len(_PREF_A), len(_PREF_B)), np.int64)
    starts: list[NDArray[np.int64]] = []
    lengths: list[NDArray[np.int64]] = []
    members: list[NDArray[np.int64]] = []
    n_groups = 0
    for ia, a in enumerate(_PREF_A):
        for ib, b in enumerate(_PREF_B):
            key = codes[:, _COL[a]] * len(VOCAB[b]) + codes[:, _COL[b]]
            counts = np.bincount(key, minlength=len(VOCAB[a]) * len(VOCAB[b]))
            base[ia, ib] = n_groups
            starts.append(len(members) * len(codes) + np.cumsum(counts) - counts)
            lengths.append(counts)
            members.append(np.argsort(key, kind="stable"))
            n_groups += counts.size
    return base, np.concatenate(starts), np.concatenate(lengths), np.concatenate(members)


def _draw_preferences(rng: np.random.Generator, items: _Items, n_users: int) -> dict[str, NDArray[np.int64]]:
    """Give each user 1-3 conjunctions (image-visible trait AND text-only trait) that real items satisfy."""
    base, start, length, members = _conjunction_groups(items.codes)
    n_prefs = rng.integers(1, 4, n_users)
    owner = np.repeat(np.arange(n_users), n_prefs)
    ta = np.where(rng.random(owner.size) < 0.25, _PREF_A.index("category"), rng.integers(0, 3, owner.size))
    tb = rng.integers(0, len(_PREF_B), owner.size)
    col_a, col_b = np.asarray([_COL[t] for t in _PREF_A]), np.asarray([_COL[t] for t in _PREF_B])
    size_b = np.asarray([len(VOCAB[t]) for t in _PREF_B])
    group = np.zeros(owner.size, np.int64)
    todo = np.arange(owner.size)
    for _ in range(10):  # anchor on a random item; redraw while the conjunction matches too few items
        anchor = rng.integers(0, len(items.codes), todo.size)
        va, vb = items.codes[anchor, col_a[ta[todo]]], items.codes[anchor, col_b[tb[todo]]]
        group[todo] = base[ta[todo], tb[todo]] + va * size_b[tb[todo]] + vb
        todo = todo[length[group[todo]] < _MIN_SUPPORT]
    first_member = members[start[group]]
    return {"owner": owner, "n_prefs": n_prefs, "ta": ta, "tb": tb, "support": length[group],
            "va": items.codes[first_member, col_a[ta]], "vb": items.codes[first_member, col_b[tb]],
            "start": start[group], "length": length[group], "members": members}


def _draw_events(rng: np.random.Generator, items: _Items, prefs: dict[str, NDArray[np.int64]],
                 config: SynthConfig) -> pl.DataFrame:
    """Draw each user's stream over all items: mostly items satisfying a conjunction, else popular ones."""
    lo, hi = config.events_per_user
    n_prefs = prefs["n_prefs"]
    user = np.repeat(np.arange(config.n_users), rng.integers(lo, hi + 1, config.n_users))
    first = (np.cumsum(n_prefs) - n_prefs)[user]
    pick = first + (rng.random(user.size) * n_prefs[user]).astype(np.int64)  # one of the user's conjunctions
    offset = (rng.random(user.size) * prefs["length"][pick]).astype(np.int64)
    liked = prefs["members"][prefs["start"][pick] + offset]
    cdf = np.cumsum(items.popularity)
    popular = np.searchsorted(cdf, rng.random(user.size) * cdf[-1], side="right")
    popular = np.minimum(popular, config.n_items - 1)  # guards rounding at the top of the cdf
    satisfied = rng.random(user.size) < _PREF_SHARE
    kind = np.where(satisfied, rng.choice(4, user.size, p=_EVENT_P[True]),
                    rng.choice(4, user.size, p=_EVENT_P[False]))
    ts = _T0_US + rng.integers(0, 60 * _DAY_US, user.size)
    return pl.DataFrame({
        "user": user, "item": np.where(satisfied, liked, popular), "ts_us": ts,
        "event": pl.Series(list(EVENT_WEIGHTS)).gather(kind),
        "weight": pl.Series(list(EVENT_WEIGHTS.values()), dtype=pl.Float64).gather(kind),
    }).sort("user", "ts_us").with_columns(ts=_utc("ts_us"))


def _preferences_frame(prefs: dict[str, NDArray[np.int64]], user_ids: pl.Series) -> pl.DataFrame:
    ta, tb = prefs["ta"], prefs["tb"]
    value_a = [VOCAB[_PREF_A[t]][v] for t, v in zip(ta.tolist(), prefs["va"].tolist(), strict=True)]
    value_b = [VOCAB[_PREF_B[t]][v] for t, v in zip(tb.tolist(), prefs["vb"].tolist(), strict=True)]
    return pl.DataFrame({
        "user_id": user_ids.gather(prefs["owner"]),
        "trait_a": pl.Series(_PREF_A, dtype=pl.String).gather(ta), "value_a": value_a,
        "trait_b": pl.Series(_PREF_B, dtype=pl.String).gather(tb), "value_b": value_b,
        "n_items": prefs["support"],  # items matching the conjunction, cold ones included
    }, schema_overrides={"value_a": pl.String, "value_b": pl.String})
