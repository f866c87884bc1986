"""A 4-class "news" data set made in code (the issue's `label,content` CSV), for the any-data-set
and import tests: each class has its own topic words, so a tiny model learns it in seconds."""

from __future__ import annotations

import csv
import random
from pathlib import Path

NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
_TOPIC = {
    0: ("president", "minister", "election", "embassy", "treaty"),
    1: ("team", "match", "goal", "coach", "league"),
    2: ("stock", "market", "profit", "bank", "shares"),
    3: ("chip", "software", "robot", "rocket", "laptop"),
}
_FILLER = ("the", "a", "new", "report", "says", "today", "after", "big", "week", "on")


def news_rows(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """n (label 0..3, text) rows: filler words plus two topic words of the label's class."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 4
        words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 4))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(_TOPIC[label]))
        out.append((label, " ".join(words)))
    return out


def write_news_csv(
    path: Path, rows: list[tuple[int, str]], *, base: int = 0, names: bool = False
) -> Path:
    """The issue's layout: header `label,content`; labels as base-based integers or names."""
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "content"])
        for label, text in rows:
            w.writerow([NEWS_CLASSES[label] if names else label + base, text])
    return path
