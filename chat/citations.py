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


# --- post-hoc attribution -------------------------------------------------------------------------
# When the model cites nothing, each sentence of its answer is attributed to the prompt source it
# copies most from, if that source contains most of the sentence's content words. This is
# "post-hoc citation" as in Gao et al., "Enabling Large Language Models to Generate Text with
# Citations" (ALCE, EMNLP 2023), with lexical coverage instead of a retriever as the matcher: a
# small model mostly copies from its sources, and coverage only credits what the source supports.

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
# Function words ignored when measuring coverage (the most frequent English words).
_STOPWORDS = frozenset(
    "a about above after again all also am an and any are as at be because been before being below between both "
    "but by can could did do does doing down during each few for from further had has have having he her here "
    "hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or "
    "other our ours out over own same she should so some such than that the their theirs them then there these "
    "they this those through to too under until up very was we were what when where which while who whom why "
    "will with would you your yours".split()
)


def content_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` without citation markers and function words."""
    words = _WORD.findall(MARKER.sub(" ", text).lower())
    return [w for w in words if w not in _STOPWORDS and (len(w) > 1 or not w.isdigit())]


def attribute(answer: str, sources: list[str], *, min_coverage: float, min_words: int = 4) -> list[int]:
    """Source numbers (1-based, in order of first use) supporting the sentences of ``answer``.

    A sentence with at least ``min_words`` content words is attributed to the source containing the
    largest share of them (ties: the earlier source), when that share is at least ``min_coverage``
    (0..1). Sentences no source supports get nothing: unsupported text is never given a citation.
    """
    vocabularies = [set(content_words(source)) for source in sources]
    cited: list[int] = []
    for sentence in _SENTENCE.split(answer):
        words = content_words(sentence)
        if len(words) < min_words:
            continue
        coverage = [sum(w in vocabulary for w in words) / len(words) for vocabulary in vocabularies]
        best = max(range(len(sources)), key=lambda i: (coverage[i], -i), default=None)
        if best is not None and coverage[best] >= min_coverage:
            cited.append(best + 1)
    return list(dict.fromkeys(cited))
