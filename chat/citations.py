"""Citation markers in generated answers: ``[n]`` names the n-th numbered source of the prompt.

``CitationFilter`` cleans the token stream as it is produced: a marker naming a source that was not
in the prompt (``[7]`` with three sources, ``[source]``) is dropped before the customer sees it, so
the streamed text and the stored answer are the same. ``parse_citations`` lists the valid markers of
a finished answer in order of first appearance.
"""

from __future__ import annotations

import re

# "[2]", "[1, 3]", "[1][2]" (the latter is two markers). Whitespace inside is tolerated.
MARKER = re.compile(r"\[\s*(\d{1,3}(?:\s*,\s*\d{1,3})*)\s*\]")
# Longest text held back while waiting for a "]" that might close a marker.
_MAX_MARKER_CHARS = 16


def marker_numbers(marker_body: str) -> list[int]:
    """The numbers of one marker's body (``"1, 3"`` -> ``[1, 3]``; ``MARKER``'s group 1)."""
    return [int(part) for part in re.split(r"\s*,\s*", marker_body.strip())]


def clean_markers(text: str, source_count: int) -> str:
    """``text`` with every ``[n, ...]`` marker reduced to the numbers in ``1..source_count``
    (a marker left with none is removed, together with one space before it)."""

    def replace(match: re.Match) -> str:
        valid = [n for n in marker_numbers(match.group(1)) if 1 <= n <= source_count]
        return "".join(f"[{n}]" for n in dict.fromkeys(valid))

    cleaned = MARKER.sub(replace, text)
    return re.sub(r" +([.,;:!?])", r"\1", cleaned) if cleaned != text else cleaned


def parse_citations(text: str, source_count: int) -> list[int]:
    """Source numbers cited in ``text`` (1-based, each once, in order of first appearance),
    keeping only numbers in ``1..source_count``."""
    numbers: list[int] = []
    for match in MARKER.finditer(text):
        numbers.extend(n for n in marker_numbers(match.group(1)) if 1 <= n <= source_count)
    return list(dict.fromkeys(numbers))


class CitationFilter:
    """Streams text through, dropping citation markers that name no source.

    ``feed(piece)`` returns the text safe to show now; text from an unmatched ``[`` is held back
    until the marker closes (or cannot be a marker any more, or grows past 16 characters).
    ``flush()`` returns whatever is held at the end.
    """

    def __init__(self, source_count: int):
        self.source_count = source_count
        self.pending = ""

    def feed(self, piece: str) -> str:
        """Add ``piece`` of the answer; returns the text that can be emitted now."""
        self.pending += piece
        out = []
        while self.pending:
            start = self.pending.find("[")
            if start < 0:
                # Hold trailing whitespace: it is dropped if a marker that names no source follows.
                body = self.pending.rstrip()
                out.append(body)
                self.pending = self.pending[len(body):]
                break
            space_start = len(self.pending[:start].rstrip())
            out.append(self.pending[:space_start])
            space, self.pending = self.pending[space_start:start], self.pending[start:]
            end = self.pending.find("]")
            if end < 0:
                if len(self.pending) > _MAX_MARKER_CHARS or not re.fullmatch(r"\[[\d\s,]*", self.pending):
                    out.append(space + self.pending[0])  # not a marker: emit the "[" and scan on
                    self.pending = self.pending[1:]
                    continue
                self.pending = space + self.pending
                break  # may still become a marker: hold it
            candidate = self.pending[: end + 1]
            if not MARKER.fullmatch(candidate):
                out.append(space + candidate[0])
                self.pending = self.pending[1:]
                continue
            cleaned = clean_markers(candidate, self.source_count)
            out.append(space + cleaned if cleaned else "")
            self.pending = self.pending[end + 1:]
        return "".join(out)

    def flush(self) -> str:
        """The held-back text (an unfinished marker is not a citation: dropped if it only holds
        digits, kept otherwise; trailing whitespace is dropped)."""
        held, self.pending = self.pending.rstrip(), ""
        return "" if re.fullmatch(r"\s*\[[\d\s,]*", held or "[") else held


def count_markers(text: str, source_count: int) -> dict:
    """``{"total": int, "valid": int}``: source numbers written in markers of ``text`` (a marker
    ``[1, 4]`` counts two) and how many of them are in ``1..source_count``."""
    numbers = [n for match in MARKER.finditer(text) for n in marker_numbers(match.group(1))]
    return {"total": len(numbers), "valid": sum(1 <= n <= source_count for n in numbers)}
