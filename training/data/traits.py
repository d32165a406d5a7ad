"""The synthetic catalog's traits: which modality shows each, their values, and the colours' pixels."""

from __future__ import annotations

# where each trait shows: only in the image, only in the text, or in both
TRAIT_KINDS: dict[str, str] = {
    "colour": "image", "pattern": "image", "shape": "image",
    "brand": "text", "material": "text", "price_band": "text",
    "category": "shared",
}
VOCAB: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "black", "white"),
    "pattern": ("solid", "stripes", "dots", "checks", "zigzag"),
    "shape": ("circle", "square", "triangle", "cross"),  # the corner badge
    "brand": ("Zorvane", "Lumetta", "Brakka", "Ostrel", "Velmora", "Quintaro",
              "Tarsko", "Ombrelle", "Fennick", "Doraxi", "Halvex", "Mirelle"),
    "material": ("leather", "cotton", "wool", "linen", "canvas", "bamboo", "steel"),
    "price_band": ("budget", "mid", "premium", "luxury"),
    "category": ("bag", "shirt", "shoe", "lamp", "mug", "hat", "bottle", "chair", "watch", "vase"),
}
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (240, 135, 20), "yellow": (235, 215, 30), "green": (30, 160, 60),
    "blue": (35, 75, 215), "purple": (130, 45, 175), "black": (25, 25, 25), "white": (240, 240, 240),
}
TRAITS = tuple(TRAIT_KINDS)  # column order of the trait codes
COLUMN = {t: i for i, t in enumerate(TRAITS)}
