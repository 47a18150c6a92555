"""Checks on text customers send (questions over the websocket, feedback comments over HTTP) before
it reaches the database; the consumer and the views call them and answer with their own error
format (``chat.error`` frame, HTTP 400).

- PostgreSQL ``text`` cannot hold the NUL character (psycopg raises ``DataError``).
- A lone surrogate (U+D800..U+DFFF, which a JSON ``"\\ud800"`` escape decodes to) cannot be encoded
  as UTF-8 (``UnicodeEncodeError``).
- A text of only whitespace and invisible format characters (Unicode category Cf: zero-width space
  U+200B, joiners, the byte-order mark U+FEFF, bidirectional marks) says nothing: it is empty.
"""

from __future__ import annotations

import re
import unicodedata

UNSTORABLE_REASON = "contains characters that cannot be stored (NUL or an unpaired surrogate)"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def is_unstorable(text: str) -> bool:
    """Whether ``text`` holds a NUL or a lone surrogate (see the module docstring)."""
    return _UNSTORABLE.search(text) is not None


def is_blank(text: str) -> bool:
    """Whether ``text`` has no visible character: only whitespace (``str.isspace``) and format
    characters (Unicode category Cf), or nothing."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)
