"""Labels: how raw labels in a data file become class indices 0..C-1.

`LabelSpec` says what the caller gave (class names from ``--labels`` or a classes file, the
integer base); `resolve_label_names` reads the rest from the data (integers 0..C-1, 1..C
with names, or names); `LabelParser` maps one raw label, with a message naming the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import DataError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from pairdots_server.storage.data import RawRow


class LabelParser:
    """Maps a raw label (int, digit string or name) to a class index.

    A name in ``label_names`` wins over reading the label as an integer; an integer k is
    class k - base (base 1: labels 1..C)."""

    def __init__(self, label_names: Sequence[str] | None, base: int = 0) -> None:
        self.names = [str(n) for n in label_names] if label_names is not None else None
        self.index = {n: i for i, n in enumerate(self.names)} if self.names else {}
        self.base = base

    def expected(self) -> str:
        if self.names:
            lo, hi = self.base, len(self.names) - 1 + self.base
            return (
                f"an integer in [{lo}, {hi}] or one of {self.names} (pass --labels / "
                "--classes-file naming every class, or --label-base 1 for labels 1..C)"
            )
        return "a non-negative integer class index"

    def __call__(self, raw: Any, where: str) -> int:
        if isinstance(raw, bool):
            raise DataError(f"{where}: label {raw!r} is a boolean; expected {self.expected()}")
        if isinstance(raw, str) and raw.strip() in self.index:
            return self.index[raw.strip()]
        value = _as_int(raw)
        if value is None:
            raise DataError(f"{where}: bad label {raw!r}; expected {self.expected()}")
        index = value - self.base
        if index < 0 or (self.names is not None and index >= len(self.names)):
            raise DataError(f"{where}: label {value} out of range; expected {self.expected()}")
        return index


@dataclass(frozen=True)
class LabelSpec:
    """How raw labels become class indices 0..C-1.

    names: the class names in index order (``--labels a,b,c`` or a classes file, one name a
    line); None reads them from the data. base: 0 or 1 for integer labels (1: label k is
    class k-1, as in AG News with its classes.txt); None decides from the data (1 when the
    integers lack 0 and reach C with names given, or start at 1 without names, else 0).
    """

    names: tuple[str, ...] | None = None
    base: int | None = None

    def __post_init__(self) -> None:
        if self.base not in (None, 0, 1):
            raise InvalidArgument.for_field("label_base", f"must be 0 or 1, got {self.base}")
        if self.names is not None:
            if len(self.names) < 2:
                raise InvalidArgument.for_field(
                    "labels", f"a classifier needs at least 2 label names, got {list(self.names)}"
                )
            if len(set(self.names)) != len(self.names) or not all(n.strip() for n in self.names):
                raise InvalidArgument.for_field(
                    "labels", f"label names repeat or are empty: {list(self.names)}"
                )

    @classmethod
    def from_options(
        cls, labels: str | Sequence[str] | None, classes_file: str | None, base: int | None
    ) -> LabelSpec:
        """From the CLI's ``--labels a,b,c`` / ``--classes-file F`` / ``--label-base``."""
        if labels is not None and classes_file:
            raise InvalidArgument.for_field(
                "labels", "pass either --labels or --classes-file, not both"
            )
        names: tuple[str, ...] | None = None
        if isinstance(labels, str):
            names = tuple(n.strip() for n in labels.split(","))
        elif labels is not None:
            names = tuple(str(n) for n in labels)
        if classes_file:
            p = Path(classes_file)
            if not p.is_file():
                raise NotFound(f"classes file {p} does not exist; one class name a line")
            names = tuple(ln.strip() for ln in p.read_text(encoding="utf-8").splitlines())
            names = tuple(n for n in names if n)
        return cls(names, base)


def _as_int(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    return None


def resolve_label_names(rows: Sequence[RawRow], spec: LabelSpec) -> tuple[list[str], int]:
    """(class names, integer base) for these rows: the spec's names, else the data's.

    From the data: integer labels 0..C-1 name their classes "0".."C-1" (1-based labels
    "1".."C"); string labels name them in sorted order. Mixed or gapped sets are DataErrors
    that say what to pass.
    """
    bad = [r for r in rows if not isinstance(r.label, str) and _as_int(r.label) is None]
    if bad:
        raise DataError(
            f"{bad[0].where}: label {bad[0].label!r} is neither an integer nor a name; "
            "expected integer class indices or class names"
        )
    as_int = {r.label: _as_int(r.label) for r in rows}
    if spec.names is not None:
        names = list(spec.names)
        base = spec.base
        if base is None:  # 1-based when the integers (not the names) lack 0 and reach C
            name_set = set(names)
            numeric = [
                v for k, v in as_int.items() if v is not None and str(k).strip() not in name_set
            ]
            base = 1 if numeric and min(numeric) >= 1 and max(numeric) >= len(names) else 0
        return names, base
    first = rows[0].where if rows else "data"
    int_values = sorted({v for v in as_int.values() if v is not None})
    strings = sorted({str(k).strip() for k, v in as_int.items() if v is None})
    if strings and int_values:
        raise DataError(
            f"{first}: the labels mix integers {int_values[:5]} and names {strings[:5]}; use one "
            "kind, or pass --labels a,b,c (index i = name i) so both can be read"
        )
    if strings:
        if len(strings) < 2:
            raise DataError(
                f"{first}: every label is {strings[0]!r}; a classifier needs at least 2 classes "
                "(pass --labels to name them all)"
            )
        return strings, 0
    lo, hi = int_values[0], int_values[-1]
    base = spec.base if spec.base is not None else (1 if lo == 1 else 0)
    if lo < base:
        raise DataError(
            f"{first}: label {lo} below {base} with --label-base {base}; expected integers "
            f"{base}..C{'-1' if base == 0 else ''}"
        )
    if lo > base:
        raise DataError(
            f"{first}: the integer labels start at {lo}, not 0 or 1; expected 0..C-1, or pass "
            "--labels / --classes-file naming every class"
        )
    count = hi - base + 1
    if count < 2:
        raise DataError(
            f"{first}: every label is {hi}; a classifier needs at least 2 classes "
            "(pass --labels to name them all)"
        )
    return [str(v) for v in range(base, hi + 1)], base
