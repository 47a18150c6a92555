"""Plain-text parser: the decoded file is the extracted text, so offsets are offsets into the file.

Paragraphs are separated by blank lines; each non-empty line is a paragraph block, and a short line
without closing punctuation that starts a paragraph group is a heading (help-center exports and
README-style files put headings on lines of their own). The first heading is level 1 (the title),
later ones level 2.
"""

from __future__ import annotations

import re

from knowledge.parsers import Block, ParsedDocument, decode_text

_GROUP = re.compile(r"\S(?:.*\S)?(?:\n[ \t]*\S.*)*")  # lines up to the next blank line
_LINE = re.compile(r"[^\n]*\S[^\n]*")
_MAX_HEADING_WORDS = 14


def looks_like_heading(line: str, next_line: str | None) -> bool:
    """Whether ``line`` (stripped) reads as a heading: short, no closing punctuation, and followed by
    a line that starts a sentence (or nothing more in its paragraph group)."""
    words = line.split()
    if not words or len(words) > _MAX_HEADING_WORDS or len(line) > 120:
        return False
    if line.startswith(("-", "*", "•")) or line[-1] in ".,;!":
        return False
    if line[-1] == "?":  # an FAQ-style question heading needs its answer right below it
        return next_line is not None and len(next_line) > len(line)
    if next_line is None:
        return True
    # A line about as long as the next one is hard-wrapped prose, not a heading.
    if len(next_line) > 60 and len(line) >= 0.7 * len(next_line):
        return False
    return not next_line[:1].islower()


def blocks_from_lines(text: str, offset: int = 0, first_heading_level: int = 1) -> list[Block]:
    """Split ``text`` into heading and paragraph blocks with offsets shifted by ``offset``.

    A heading that opens the text gets ``first_heading_level`` (the title); later headings, and all
    headings of a text that opens with a paragraph, get level 2.
    """
    blocks: list[Block] = []
    seen_heading = first_heading_level > 1
    for group in _GROUP.finditer(text):
        lines = list(_LINE.finditer(group.group()))
        for index, line in enumerate(lines):
            raw = line.group()
            stripped = raw.strip()
            lead = len(raw) - len(raw.lstrip())
            start = offset + group.start() + line.start() + lead
            end = start + len(stripped)
            following = lines[index + 1].group().strip() if index + 1 < len(lines) else None
            if index == 0 and looks_like_heading(stripped, following):
                level = 2 if seen_heading or blocks else first_heading_level
                blocks.append(Block("heading", start, end, level))
                seen_heading = True
            else:
                blocks.append(Block("paragraph", start, end))
    return blocks


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse UTF-8 text; raises ``ParseError`` for bytes that are not UTF-8."""
    text = decode_text(data)
    blocks = blocks_from_lines(text)
    # The title is a heading that opens the file; otherwise parse_file falls back to the file name.
    title = text[blocks[0].start : blocks[0].end] if blocks and blocks[0].level == 1 else ""
    return ParsedDocument(title=title, text=text, blocks=blocks)
