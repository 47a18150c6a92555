"""Word (.docx) parser (python-docx): paragraphs in order, "Title"/"Heading N" styles as headings,
table rows as "cell | cell" paragraphs."""

from __future__ import annotations

import io
import re
import zipfile

import docx
from docx.document import Document as DocumentObject
from docx.table import Table
from docx.text.paragraph import Paragraph

from knowledge.parsers import ParsedDocument, ParseError, TextBuilder

_HEADING_STYLE = re.compile(r"^heading (\d)$", re.IGNORECASE)


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse a .docx file; raises ``ParseError`` for a corrupt or non-Word file."""
    try:
        document: DocumentObject = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ParseError(f"corrupt or unreadable Word document ({error})") from None
    except Exception as error:  # python-docx raises package-specific errors for broken parts
        raise ParseError(f"corrupt or unreadable Word document ({type(error).__name__}: {error})") from None
    title = document.core_properties.title or ""
    builder = TextBuilder(title)
    for item in document.iter_inner_content():
        if isinstance(item, Paragraph):
            style = (item.style.name if item.style is not None else "") or ""
            match = _HEADING_STYLE.match(style)
            if style.lower() == "title":
                builder.add("heading", item.text, 1)
            elif match:
                builder.add("heading", item.text, int(match.group(1)))
            else:
                builder.add("paragraph", item.text)
        elif isinstance(item, Table):
            for row in item.rows:
                cells = []
                for cell in row.cells:
                    value = cell.text.strip()
                    if value and (not cells or cells[-1] != value):  # merged cells repeat
                        cells.append(value)
                builder.add("paragraph", " | ".join(cells))
    return builder.build()
