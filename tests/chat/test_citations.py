"""Citation markers: parsing, cleaning the token stream, counting, and post-hoc attribution."""

from __future__ import annotations

import pytest

from chat.citations import CitationFilter, clean_markers, count_markers, parse_citations


def stream(pieces, source_count=3):
    citation_filter = CitationFilter(source_count)
    return "".join(citation_filter.feed(piece) for piece in pieces) + citation_filter.flush()


def test_parse_citations_keeps_valid_numbers_once_in_order():
    assert parse_citations("See [2] and [1, 3] then [2][9] and [0].", 3) == [2, 1, 3]
    assert parse_citations("no markers", 3) == []


def test_clean_markers_drops_numbers_outside_the_sources():
    assert clean_markers("Renew online [4]. Or by mail [1, 5].", 3) == "Renew online. Or by mail [1]."


def test_count_markers():
    assert count_markers("[1] a [1, 7] b [x] c [3]", 3) == {"total": 4, "valid": 3}


@pytest.mark.parametrize("pieces, expected", [
    (["Renew", " online", " [", "7", "]", " or", " by", " mail", " [1", "]", "."], "Renew online or by mail [1]."),
    (["a [b] c [2][9] d [1, 5]. [3"], "a [b] c [2] d [1]."),
    (["x ", "[4]", " y "], "x y"),
    (["list [", "see above] ok"], "list [see above] ok"),
    (["Fees [", "2", "]", " apply"], "Fees [2] apply"),
    (["[" + "1" * 20], "[" + "1" * 20),
])
def test_the_stream_filter_drops_invalid_markers_across_token_boundaries(pieces, expected):
    assert stream(pieces) == expected


def test_the_stream_filter_holds_an_open_bracket_until_it_resolves():
    citation_filter = CitationFilter(3)
    assert citation_filter.feed("Renew online [") == "Renew online"
    assert citation_filter.feed("2") == ""
    assert citation_filter.feed("] today") == " [2] today"
