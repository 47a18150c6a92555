"""PDF parser (pypdf): the text layer of every page, split into headings and paragraphs like plain
text. Scanned PDFs without a text layer fail with a clear reason (no OCR)."""

from __future__ import annotations

import io

from pypdf import PdfReader
from pypdf.errors import PdfReadError, PyPdfError

from knowledge.parsers import ParsedDocument, ParseError, TextBuilder
from knowledge.parsers.text import blocks_from_lines


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse a PDF; raises ``ParseError`` for a corrupt, encrypted or image-only file."""
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise ParseError("the PDF is encrypted; upload an unprotected copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except ParseError:
        raise
    except (PdfReadError, PyPdfError, ValueError, TypeError, KeyError, OSError) as error:
        raise ParseError(f"corrupt or unreadable PDF ({error})") from None
    builder = TextBuilder(str(title))
    for page_text in pages:
        for block in blocks_from_lines(page_text, first_heading_level=1 if not builder.blocks else 2):
            builder.add(block.kind, page_text[block.start : block.end], block.level)
    if not builder.blocks:
        raise ParseError("the PDF has no text layer (scanned images are not supported)")
    return builder.build()
