"""Chunking: structure-aware, token-bounded spans with exact character offsets.

Exact-value tests count tokens as whitespace-separated words (a fake tokenizer, so the expected
spans can be written down); the property tests use the real embedding model's tokenizer and
``settings.CHUNK_MAX_TOKENS`` on one file of every supported type.
"""

from __future__ import annotations

import re

import pytest
from django.conf import settings

from knowledge.chunking import ChunkSpan, chunk_document
from knowledge.parsers import parse_file
from tests.knowledge.sample_files import RETURNS_MD, good_files


def words(text: str) -> int:
    return len(text.split())


def spans_as_text(document, spans) -> list[tuple[tuple[str, ...], str]]:
    return [(span.heading_path, document.text[span.start : span.end]) for span in spans]


def test_blocks_under_one_heading_are_packed_and_a_heading_starts_a_new_chunk():
    # given a Markdown page with a title and two sections
    document = parse_file("returns.md", RETURNS_MD.encode())
    # when it is chunked with room for everything
    spans = chunk_document(document, max_tokens=200, count_tokens=words)
    # then each section is one chunk under its heading path (outermost first)
    assert spans_as_text(document, spans) == [
        (("Returns policy",), "You can return any item within 30 days of delivery."),
        (("Returns policy", "Refunds"),
         "Refunds go back to the original payment method within 5 business days.\n\n"
         "- The item must be unused\n- Keep the receipt"),
        (("Returns policy", "Exchanges"), "Exchanges for another size are free."),
    ]
    assert spans[1] == ChunkSpan(83, 199, ("Returns policy", "Refunds"), 22)


def test_a_heading_of_the_same_or_higher_level_closes_the_deeper_ones():
    # given headings # A, ## B, ### C, ## D, # E
    text = "# A\n\none.\n\n## B\n\ntwo.\n\n### C\n\nthree.\n\n## D\n\nfour.\n\n# E\n\nfive.\n"
    document = parse_file("levels.md", text.encode())
    spans = chunk_document(document, max_tokens=50, count_tokens=words)
    # then each chunk's heading path is the stack of open headings
    assert spans_as_text(document, spans) == [
        (("A",), "one."),
        (("A", "B"), "two."),
        (("A", "B", "C"), "three."),
        (("A", "D"), "four."),
        (("E",), "five."),
    ]


def test_blocks_are_packed_only_while_they_fit():
    # given three 5-word paragraphs under one heading, and room for 12 words
    text = "# Hours\n\nWe open at nine daily.\n\nWe close at six daily.\n\nWe rest on public holidays.\n"
    document = parse_file("hours.md", text.encode())
    spans = chunk_document(document, max_tokens=12, count_tokens=words)
    # then the first two share a chunk and the third starts the next one
    assert spans_as_text(document, spans) == [
        (("Hours",), "We open at nine daily.\n\nWe close at six daily."),
        (("Hours",), "We rest on public holidays."),
    ]
    assert [span.token_count for span in spans] == [10, 5]


def test_a_long_paragraph_is_split_at_sentence_ends():
    # given one paragraph of six 5-word sentences (30 words) and room for 12 words
    sentences = [f"Step {n} takes one minute." for n in range(1, 7)]
    document = parse_file("steps.txt", (" ".join(sentences) + "\n").encode())
    spans = chunk_document(document, max_tokens=12, count_tokens=words)
    # then it is cut between sentences, two per chunk
    assert spans_as_text(document, spans) == [
        ((), "Step 1 takes one minute. Step 2 takes one minute."),
        ((), "Step 3 takes one minute. Step 4 takes one minute."),
        ((), "Step 5 takes one minute. Step 6 takes one minute."),
    ]
    assert [(span.start, span.end, span.token_count) for span in spans] == [(0, 49, 10), (50, 99, 10), (100, 149, 10)]


def test_a_dot_inside_a_number_or_address_does_not_end_a_sentence():
    # given a long paragraph whose first sentence holds "1.5", "99.90" and "example.com"
    text = ("The jacket weighs 1.5 kg and costs 99.90 dollars at example.com today. "
            + " ".join(f"Sentence number {n} is here." for n in range(4)) + "\n")
    document = parse_file("jacket.txt", text.encode())
    spans = chunk_document(document, max_tokens=12, count_tokens=words)
    # then no text is lost and the first sentence is kept whole
    assert spans_as_text(document, spans) == [
        ((), "The jacket weighs 1.5 kg and costs 99.90 dollars at example.com today."),
        ((), "Sentence number 0 is here. Sentence number 1 is here."),
        ((), "Sentence number 2 is here. Sentence number 3 is here."),
    ]


def test_a_sentence_longer_than_the_bound_is_split_at_word_boundaries():
    # given one 20-word sentence and room for 8 words
    text = " ".join(f"w{n}" for n in range(20)) + ".\n"
    document = parse_file("long.txt", text.encode())
    spans = chunk_document(document, max_tokens=8, count_tokens=words)
    # then it is cut between words, 8 + 8 + 4
    assert spans_as_text(document, spans) == [
        ((), "w0 w1 w2 w3 w4 w5 w6 w7"),
        ((), "w8 w9 w10 w11 w12 w13 w14 w15"),
        ((), "w16 w17 w18 w19."),
    ]


def test_a_word_longer_than_the_bound_is_kept_whole():
    # given a token counter in characters and a 35-character word
    document = parse_file("word.txt", b"Supercalifragilisticexpialidocious.\n")
    spans = chunk_document(document, max_tokens=8, count_tokens=len)
    # then the word is one chunk over the bound rather than cut mid-word
    assert spans == [ChunkSpan(0, 35, (), 35)]


def test_each_faq_row_is_one_chunk_even_when_rows_would_fit_together():
    # given an FAQ sheet of three short rows and room for all of them
    data = ("question,answer\n"
            "Do you ship abroad?,Yes to 40 countries.\n"
            "Is gift wrap free?,Yes always.\n"
            "Can I pay by invoice?,Only for business accounts.\n").encode()
    document = parse_file("faq.csv", data)
    spans = chunk_document(document, max_tokens=200, count_tokens=words)
    # then each row is a chunk of its own
    assert spans_as_text(document, spans) == [
        ((), "Do you ship abroad?\nYes to 40 countries."),
        ((), "Is gift wrap free?\nYes always."),
        ((), "Can I pay by invoice?\nOnly for business accounts."),
    ]


def test_an_faq_row_over_the_bound_is_split_without_taking_its_neighbours():
    # given an FAQ row of 24 words between two short rows, and room for 12 words
    long_answer = "Pack it well. Print the label. Drop it at any post office. We refund you in five days."
    data = ("question,answer\n"
            "Do you ship abroad?,Yes to 40 countries.\n"
            f"How do I send a return back?,{long_answer}\n"
            "Is gift wrap free?,Yes always.\n").encode()
    document = parse_file("faq.csv", data)
    spans = chunk_document(document, max_tokens=12, count_tokens=words)
    # then every chunk fits, and no chunk mixes two rows
    assert spans_as_text(document, spans) == [
        ((), "Do you ship abroad?\nYes to 40 countries."),
        ((), "How do I send a return back?\nPack it well."),
        ((), "Print the label. Drop it at any post office."),
        ((), "We refund you in five days."),
        ((), "Is gift wrap free?\nYes always."),
    ]
    assert all(span.token_count <= 12 for span in spans)


def test_max_tokens_below_eight_is_refused():
    document = parse_file("returns.md", RETURNS_MD.encode())
    with pytest.raises(ValueError, match="max_tokens must be at least 8"):
        chunk_document(document, max_tokens=7, count_tokens=words)


# --- real tokenizer, every parser ------------------------------------------------------------------


def long_help_page() -> str:
    """A Markdown page whose second section is one paragraph of about 3x CHUNK_MAX_TOKENS tokens."""
    sentences = [
        f"If your parcel number {n} has not arrived within ten business days, contact our support team "
        f"with the order number and the delivery address so that we can trace it with the carrier."
        for n in range(1, 17)
    ]
    return "# Delivery help\n\nMost parcels arrive on time.\n\n## Late parcels\n\n" + " ".join(sentences) + "\n"


SAMPLES = {**good_files(), "delivery.md": long_help_page().encode()}


@pytest.mark.parametrize("filename", sorted(SAMPLES))
def test_every_parser_chunks_are_exact_bounded_ordered_spans_covering_the_text(filename, embedding_model):
    # given a realistic file of each type
    document = parse_file(filename, SAMPLES[filename])
    # when it is chunked with the real tokenizer and the configured bound
    spans = chunk_document(document, max_tokens=settings.CHUNK_MAX_TOKENS, count_tokens=embedding_model.count_tokens)
    assert spans
    for span in spans:
        text = document.text[span.start : span.end]
        # then each span is trimmed text, its token count is exact and within the bound
        assert text == text.strip() and text
        assert span.token_count == embedding_model.count_tokens(text)
        assert span.token_count <= settings.CHUNK_MAX_TOKENS
    # and the spans are in order and do not overlap
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    # and every non-space character of every non-heading block lies in a chunk
    for block in document.blocks:
        if block.kind == "heading":
            continue
        for offset in range(block.start, block.end):
            if not document.text[offset].isspace():
                assert any(span.start <= offset < span.end for span in spans), (filename, offset)


def test_long_paragraph_with_real_tokenizer_splits_at_sentence_ends_and_keeps_its_heading(embedding_model):
    # given a section whose one paragraph is about three times the token bound
    document = parse_file("delivery.md", long_help_page().encode())
    paragraph = document.blocks[-1]
    assert embedding_model.count_tokens(document.text[paragraph.start : paragraph.end]) > 2 * settings.CHUNK_MAX_TOKENS
    spans = chunk_document(document, max_tokens=settings.CHUNK_MAX_TOKENS, count_tokens=embedding_model.count_tokens)
    late = [span for span in spans if span.heading_path == ("Delivery help", "Late parcels")]
    # then it becomes at least three chunks, each a run of whole sentences, and they tile the paragraph
    assert len(late) >= 3
    assert late[0].start == paragraph.start and late[-1].end == paragraph.end
    for span in late:
        text = document.text[span.start : span.end]
        assert re.fullmatch(r"(If your parcel number \d+ [^.]*\.\s?)+", text), text
    assert all(document.text[a.end : b.start] == " " for a, b in zip(late, late[1:]))
    assert spans[0].heading_path == ("Delivery help",)
