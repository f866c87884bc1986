"""ListModels pagination (AIP-158): pages cover every name once, in order; bad input is
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import pytest

from pairdots_server.errors import InvalidArgument
from pairdots_server.rpc import paging

NAMES = [f"m{i:03d}" for i in range(7)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 0])
def test_pages_cover_every_name_once(size: int) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = paging.paginate(list(reversed(NAMES)), size, token)
        seen += page
        pages += 1
        assert len(page) <= (size or paging.DEFAULT_PAGE_SIZE)
        if not token:
            break
    assert seen == NAMES
    assert pages == -(-len(NAMES) // (size or paging.DEFAULT_PAGE_SIZE))


def test_page_size_is_clamped_and_checked() -> None:
    assert paging.page_size(10_000) == paging.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument) as err:
        paging.page_size(-1)
    assert err.value.violations[0].field == "page_size"


# not base64, not base64 either, base64 of "not-a-token" (decodes, wrong form), bad padding
@pytest.mark.parametrize("token", ["bogus", "!!", "bm90LWEtdG9rZW4=", "YWZ0ZXI"])
def test_foreign_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        paging.decode_token(token)
    assert err.value.violations[0].field == "page_token"


def test_a_token_continues_after_its_name() -> None:
    page, _ = paging.paginate(NAMES, 2, paging.encode_token("m003"))
    assert page == ["m004", "m005"]
