"""FAQ sheet parser: a CSV with a question column and an answer column; each row is one FAQ entry.

Column names are matched case-insensitively (``question``/``q``, ``answer``/``a``); other columns are
ignored. Each entry becomes a ``faq`` block "question\\nanswer", so it is retrieved and cited whole.
"""

from __future__ import annotations

import csv
import io
from pathlib import PurePath

from knowledge.parsers import ParsedDocument, ParseError, TextBuilder, decode_text

_QUESTION = {"question", "q", "questions"}
_ANSWER = {"answer", "a", "answers"}


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse a CSV FAQ sheet; raises ``ParseError`` without question and answer columns or rows."""
    text = decode_text(data)
    sample = text[:4096]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise ParseError("the CSV file has no header row") from None
    names = [name.strip().lower() for name in header]
    q_index = next((i for i, n in enumerate(names) if n in _QUESTION), None)
    a_index = next((i for i, n in enumerate(names) if n in _ANSWER), None)
    if q_index is None or a_index is None:
        found = ", ".join(repr(h.strip()) for h in header) or "none"
        raise ParseError(
            f"a CSV FAQ sheet needs a 'question' column and an 'answer' column; found columns: {found}"
        )
    builder = TextBuilder(PurePath(filename).stem.replace("_", " ").replace("-", " ").strip())
    try:
        for row in reader:
            if len(row) <= max(q_index, a_index):
                continue
            question, answer = row[q_index].strip(), row[a_index].strip()
            if question and answer:
                builder.add("faq", f"{question}\n{answer}")
    except csv.Error as error:
        raise ParseError(f"malformed CSV ({error})") from None
    if not builder.blocks:
        raise ParseError("the CSV FAQ sheet has no rows with both a question and an answer")
    return builder.build()
