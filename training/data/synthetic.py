"""Synthetic catalog, rendered images and interactions whose ground truth needs both modalities.

Colour, pattern and shape show only in the image; brand, material and price band only in the text;
category in both. Users prefer conjunctions of an image-visible trait and a text-only trait (red AND
leather), which a sum of per-modality vectors cannot express. Everything is drawn from generators
seeded by ``SynthConfig.seed``, so one config gives identical frames and pixels.

``SynthConfig.preferences`` picks how users' conjunctions are drawn (`conjunctions.py`):

- "mixed" (the default, presets small, medium, tiny): 1-3 conjunctions a user on any trait pairs, a
  quarter on `category`; 80% of events on them, spread over 60 days. Scored with vectors built from the
  true traits, this leaves early fusion little to win: a sum of one-hot image and text parts reaches
  recall@20 0.15-0.21 and adding an (image value x text value) part gains +0.00..+0.01. A third of
  users hold one conjunction, which a sum already ranks first (red + leather scores red AND leather
  highest); `category` is stated in the title, so text alone serves a quarter of them; a user's
  conjunctions rarely share a trait pair; and with a 7-day history half-life, 60 days of events leave
  mostly the newest conjunction in the history vector.
- "crossed" (presets conjunction, conjunction-tiny): every user holds exactly two conjunctions on ONE
  pair of an image-only and a text-only trait with both values different (red AND leather, blue AND
  cotton), so a sum scores red+cotton like red+leather and only a joint representation tells them
  apart. Each is matched by >= 3 items where the catalog allows; `category` never appears; with
  `preference_share` 0.95 and `event_days` 3 the history holds both. Oracle vectors
  (`training/evaluation/oracles.py`) then put the conjunction part +0.04..+0.05 recall@20 ahead of the
  sum, 95% intervals above 0 on seeds 0-2 (0.00 on "small").
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
from training.data.conjunctions import PREFERENCE_MODES, Preferences, draw_preferences, preferences_frame
from training.data.render import write_images
from training.data.traits import COLOUR_RGB, COLUMN, TRAIT_KINDS, TRAITS, VOCAB

logger = logging.getLogger(__name__)

# words that would leak an image-only trait into the text, typos included
FORBIDDEN_WORDS = frozenset(
    [w for t, k in TRAIT_KINDS.items() if k == "image" for w in VOCAB[t]]
    + ["stripe", "striped", "dot", "dotted", "check", "checked", "checkered", "round", "colour", "color"]
)

_TRAITS, _COL = TRAITS, COLUMN
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
    preferences: str = "mixed"  # or "crossed": how users' conjunctions are drawn (module docstring)
    preference_share: float = 0.8  # share of events on an item satisfying one of the user's conjunctions
    event_days: int = 60  # events fall uniformly in [2024-01-01, + event_days); history half-life is 7

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
            (self.preferences in PREFERENCE_MODES,
             f"preferences={self.preferences!r} must be one of {PREFERENCE_MODES}"),
            (0 <= self.preference_share <= 1, f"preference_share={self.preference_share} must be in [0, 1]"),
            (self.event_days >= 1, f"event_days={self.event_days} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Catalogs of `onetower evaluate --preset NAME`. Both modalities carry signal the other lacks: users like
# conjunctions of an image-side trait (colour, pattern, shape: image only; category: both) and a text-only
# one (brand, material, price band), 10% of items lack their image and 10% their text, 10% are cold.
# "conjunction" is the crossed mode, where early fusion has something to win over a sum of modalities.
PRESETS: dict[str, SynthConfig] = {
    "small": SynthConfig(n_items=1000, n_users=600, seed=0),
    "medium": SynthConfig(n_items=5000, n_users=3000, seed=0),
    "tiny": SynthConfig(n_items=200, n_users=80, image_size=32, seed=2),  # tests: the same command in seconds
    "conjunction": SynthConfig(n_items=1000, n_users=600, seed=0, preferences="crossed",
                               preference_share=0.95, event_days=3),
    "conjunction-tiny": SynthConfig(n_items=200, n_users=80, image_size=32, seed=2, preferences="crossed",
                                    preference_share=0.95, event_days=3),
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
    prefs = draw_preferences(rng, items.codes, config.n_users, config.preferences)
    events = _draw_events(rng, items, prefs, config)
    user_ids = _ids("user", config.n_users)
    preferences_frame(prefs, user_ids).write_parquet(ds.preferences)
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


def _draw_events(rng: np.random.Generator, items: _Items, prefs: Preferences,
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
    satisfied = rng.random(user.size) < config.preference_share
    kind = np.where(satisfied, rng.choice(4, user.size, p=_EVENT_P[True]),
                    rng.choice(4, user.size, p=_EVENT_P[False]))
    ts = _T0_US + rng.integers(0, config.event_days * _DAY_US, user.size)
    return pl.DataFrame({
        "user": user, "item": np.where(satisfied, liked, popular), "ts_us": ts,
        "event": pl.Series(list(EVENT_WEIGHTS)).gather(kind),
        "weight": pl.Series(list(EVENT_WEIGHTS.values()), dtype=pl.Float64).gather(kind),
    }).sort("user", "ts_us").with_columns(ts=_utc("ts_us"))
