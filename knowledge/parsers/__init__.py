"""Parsers: raw file bytes -> extracted text plus its structure (headings, paragraphs, FAQ rows).

Every parser returns a ``ParsedDocument`` whose ``blocks`` carry character offsets ``[start, end)``
into ``text``; chunking and citations rely on them. Parsers raise ``ParseError`` with a sentence a
support admin can act on; they never return an empty document.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable


class ParseError(ValueError):
    """The file cannot become knowledge-base text; ``str(error)`` is the reason shown to admins."""


@dataclass(frozen=True)
class Block:
    """A structural unit of a document: ``text[start:end]`` of its ``ParsedDocument``.

    ``kind`` is ``"heading"`` (with ``level`` 1..6), ``"paragraph"`` (prose, list item, table row,
    code) or ``"faq"`` (one question with its answer, never split from its neighbours' headings).
    """

    kind: str
    start: int
    end: int
    level: int = 0


@dataclass
class ParsedDocument:
    """Extracted ``text`` (what offsets point into), a ``title`` and ordered, non-overlapping ``blocks``."""

    title: str
    text: str
    blocks: list[Block] = field(default_factory=list)


class TextBuilder:
    """Builds a document's text from blocks, joined by blank lines, recording each block's offsets.

    Used by parsers whose formats have no plain text of their own (HTML, PDF, DOCX, CSV).
    """

    def __init__(self, title: str = ""):
        self.title = title
        self._parts: list[str] = []
        self._length = 0
        self.blocks: list[Block] = []

    def add(self, kind: str, text: str, level: int = 0) -> None:
        """Append ``text`` (whitespace-trimmed; empty text is ignored) as a block of ``kind``."""
        text = text.strip()
        if not text:
            return
        if self._parts:
            self._parts.append("\n\n")
            self._length += 2
        self.blocks.append(Block(kind, self._length, self._length + len(text), level))
        self._parts.append(text)
        self._length += len(text)

    def build(self) -> ParsedDocument:
        """Return the document; raises ``ParseError`` if no block has text."""
        if not self.blocks:
            raise ParseError("no text could be extracted from the file")
        text = "".join(self._parts)
        title = self.title.strip() or _first_heading(text, self.blocks)
        return ParsedDocument(title=title, text=text, blocks=self.blocks)


def _first_heading(text: str, blocks: list[Block]) -> str:
    for block in blocks:
        if block.kind == "heading":
            return text[block.start : block.end]
    return ""


def decode_text(data: bytes) -> str:
    """Decode UTF-8 (a byte-order mark is dropped); raises ``ParseError`` naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ParseError(
            f"the file is not valid UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8 and upload it again"
        ) from None


# File extension -> parser module of this package (imported on first use).
_PARSER_MODULES = {
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".csv": "csv_faq",
}
SUPPORTED_EXTENSIONS = tuple(_PARSER_MODULES)


def _parser_for(suffix: str) -> Callable[[bytes, str], ParsedDocument] | None:
    module = _PARSER_MODULES.get(suffix)
    return importlib.import_module(f"knowledge.parsers.{module}").parse if module else None


def parse_file(filename: str, data: bytes) -> ParsedDocument:
    """Parse ``data`` according to the extension of ``filename``.

    Raises ``ParseError`` for an empty file, an unsupported extension, or content the parser cannot
    read (corrupt PDF/DOCX, non-UTF-8 text, CSV without question/answer columns, no text at all).
    """
    suffix = PurePath(filename).suffix.lower()
    parser = _parser_for(suffix)
    if parser is None:
        shown = suffix or "(no extension)"
        raise ParseError(
            f"unsupported file type {shown}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not data.strip():
        raise ParseError("the file is empty")
    document = parser(data, filename)
    if not document.blocks or not any(b.kind != "heading" for b in document.blocks):
        raise ParseError("no text could be extracted from the file")
    if not document.title:
        document.title = PurePath(filename).stem.replace("_", " ")
    return document
