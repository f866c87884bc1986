"""argparse types of the numeric command-line flags: a bad value (or a bad PAIRDOTS_*
fallback, which argparse passes through the same type) is a usage error naming the flag,
not a traceback."""

from __future__ import annotations

import argparse


def int_value(text: str) -> int:
    """argparse type of an integer flag (its PAIRDOTS_* default too): a clean usage error."""
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def optional_int_value(text: str) -> int | None:
    """An integer flag where "" (an empty PAIRDOTS_* variable) means unset."""
    return None if text == "" else int_value(text)


def float_value(text: str) -> float:
    """argparse type of a number flag (its PAIRDOTS_* default too)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
