"""Pagination of List RPCs by name (AIP-158): page i+1 starts after the last name of page i.

A page token is the URL-safe base64 of "after:<last name>", opaque to callers; a token that
does not decode to that form is INVALID_ARGUMENT. Names are listed in sorted order, so a page
is stable while models are added or removed (it continues after the last name seen).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from pairdots_server.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_PREFIX = "after:"


def page_size(requested: int) -> int:
    """0 → DEFAULT_PAGE_SIZE; above MAX_PAGE_SIZE → MAX_PAGE_SIZE; negative → INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument.for_field(
            "page_size",
            f"is {requested}; use 0 (server default, {DEFAULT_PAGE_SIZE}) or a "
            f"positive number (at most {MAX_PAGE_SIZE} are returned)",
        )
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def encode_token(last_name: str) -> str:
    return base64.urlsafe_b64encode((_PREFIX + last_name).encode("utf-8")).decode("ascii")


def decode_token(token: str) -> str:
    """The last name of the previous page; INVALID_ARGUMENT for a token we did not make."""
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    if not text.startswith(_PREFIX):
        raise InvalidArgument.for_field(
            "page_token",
            "is not a token this server returned; pass the previous response's "
            "next_page_token, or leave it empty for the first page",
        )
    return text[len(_PREFIX) :]


def paginate(names: Sequence[str], size: int, token: str) -> tuple[list[str], str]:
    """(the page's names, next_page_token) of sorted `names`."""
    after = decode_token(token) if token else None
    rest = [n for n in sorted(names) if after is None or n > after]
    page = rest[: page_size(size)]
    return page, encode_token(page[-1]) if len(rest) > len(page) else ""
