"""The grounded prompt: numbered sources, the question, the instruction; page footnote marks removed."""

from __future__ import annotations

from chat.prompts import INSTRUCTION, grounded_messages, source_excerpt
from knowledge.selectors import RetrievedChunk


def chunk(text: str, title: str = "Plates") -> RetrievedChunk:
    return RetrievedChunk(chunk_id=1, source_id=1, source_uri="/kb/plates.txt", source_title=title,
                          collection="default", ordinal=0, start=0, end=len(text), text=text)


def test_sources_are_numbered_in_order_with_their_titles():
    messages = grounded_messages(" Can I keep my plates? ", [chunk("Surrender them."), chunk("Or transfer them.", "Transfer")],
                                 max_chars=100)
    assert messages == [{"role": "user", "content": (
        "Sources:\n[1] Plates: Surrender them.\n\n[2] Transfer: Or transfer them.\n\n"
        f"Question: Can I keep my plates?\n{INSTRUCTION}"
    )}]


def test_footnote_marks_of_the_page_are_removed_so_only_source_labels_look_like_citations():
    text = "Do not surrender your plates [2] before your insurance\n\nends [1, 3]."
    assert source_excerpt(chunk(text), 200) == "Do not surrender your plates before your insurance ends ."
    assert "[2]" not in grounded_messages("q", [chunk(text, "Do not [4]")], max_chars=200)[0]["content"]


def test_long_sources_are_cut_at_a_word_boundary():
    assert source_excerpt(chunk("alpha beta gamma delta"), 13) == "alpha beta …"
