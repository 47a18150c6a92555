"""Structure-aware, token-bounded chunking with character offsets.

Blocks under the same heading path are packed into one chunk while they fit in ``max_tokens``
(tokens of the embedding model's tokenizer); a heading always starts a new chunk; an FAQ entry is
always a chunk of its own. A block longer than ``max_tokens`` is split at sentence ends, and a
sentence longer than that at word boundaries. Each chunk is a span ``[start, end)`` of the
document's text, so ``document.text[start:end]`` is exactly the chunk's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from knowledge.parsers import Block, ParsedDocument

# A sentence runs to [.!?] followed by whitespace (or the end), or to a line break; a "." inside a
# token ("1.5 kg", "example.com") does not end it, so every character belongs to some sentence.
_SENTENCE = re.compile(r"(?:[^.!?\n]|[.!?](?!\s|$))*(?:[.!?]+(?=\s|$)|\n|$)")
_WORDS = re.compile(r"\S+")


@dataclass(frozen=True)
class ChunkSpan:
    """A chunk of a document: ``text[start:end]``, the headings above it (outermost first) and its
    size in tokens."""

    start: int
    end: int
    heading_path: tuple[str, ...]
    token_count: int


def chunk_document(
    document: ParsedDocument, *, max_tokens: int, count_tokens: Callable[[str], int]
) -> list[ChunkSpan]:
    """Split ``document`` into chunks of at most ``max_tokens`` tokens (``count_tokens(text)``).

    Raises ``ValueError`` if ``max_tokens`` < 8. A span that cannot be split further (one word longer
    than ``max_tokens``) is kept whole.
    """
    if max_tokens < 8:
        raise ValueError("max_tokens must be at least 8")
    text = document.text
    chunks: list[ChunkSpan] = []
    headings: list[tuple[int, str]] = []  # (level, heading text) stack
    pending: list[tuple[int, int, int]] = []  # (start, end, tokens) of packed pieces

    def path() -> tuple[str, ...]:
        return tuple(title for _, title in headings)

    def flush() -> None:
        if pending:
            start, end = pending[0][0], pending[-1][1]
            chunks.append(ChunkSpan(start, end, path(), count_tokens(text[start:end])))
            pending.clear()

    def pending_tokens() -> int:
        return sum(tokens for _, _, tokens in pending)

    for block in document.blocks:
        if block.kind == "heading":
            flush()
            level = block.level or 1
            while headings and headings[-1][0] >= level:
                headings.pop()
            headings.append((level, " ".join(text[block.start : block.end].split())))
            continue
        pieces = _split(text, block, max_tokens, count_tokens)
        if block.kind == "faq":
            # Never packed with a neighbour; an entry over max_tokens becomes several chunks.
            flush()
            for piece in pieces:
                pending.append(piece)
                flush()
            continue
        for piece in pieces:
            if pending and pending_tokens() + piece[2] > max_tokens:
                flush()
            pending.append(piece)
    flush()
    return chunks


def _split(
    text: str, block: Block, max_tokens: int, count_tokens: Callable[[str], int]
) -> list[tuple[int, int, int]]:
    """Pieces ``(start, end, tokens)`` of ``block`` that each fit ``max_tokens`` where possible."""
    tokens = count_tokens(text[block.start : block.end])
    if tokens <= max_tokens:
        return [(block.start, block.end, tokens)]
    segment = text[block.start : block.end]
    units = [
        (block.start + m.start(), block.start + m.end())
        for m in _SENTENCE.finditer(segment)
        if m.group().strip()
    ]
    pieces: list[tuple[int, int, int]] = []
    for start, end in units:
        start, end = _trim(text, start, end)
        unit_tokens = count_tokens(text[start:end])
        if unit_tokens > max_tokens:
            pieces.extend(_split_words(text, start, end, max_tokens, count_tokens))
        else:
            pieces.append((start, end, unit_tokens))
    return _pack(text, pieces, max_tokens, count_tokens)


def _split_words(text, start, end, max_tokens, count_tokens):
    words = [(start + m.start(), start + m.end()) for m in _WORDS.finditer(text[start:end])]
    pieces = []
    for word_start, word_end in words:
        pieces.append((word_start, word_end, count_tokens(text[word_start:word_end])))
    return _pack(text, pieces, max_tokens, count_tokens)


def _pack(text, pieces, max_tokens, count_tokens):
    """Greedily merge adjacent pieces while the merged span still fits ``max_tokens``."""
    packed: list[tuple[int, int, int]] = []
    for start, end, tokens in pieces:
        if packed and packed[-1][2] + tokens <= max_tokens:
            merged = (packed[-1][0], end, count_tokens(text[packed[-1][0] : end]))
            if merged[2] <= max_tokens:
                packed[-1] = merged
                continue
        packed.append((start, end, tokens))
    return packed


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
