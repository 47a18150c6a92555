"""The grounded prompt: numbered sources and instructions to answer only from them, citing ``[n]``.

Kept short on purpose: the default model (SmolLM2-135M-Instruct) follows brief instructions and a
few short sources much better than long ones, and prompt length is most of the time to first token.
"""

from __future__ import annotations

from typing import Sequence

from chat.citations import MARKER
from knowledge.selectors import RetrievedChunk

# The instruction follows the sources and the question (recency helps a small model follow it). Measured
# on 12 Doc2Dial first-turn questions against five other layouts (system-prompt instructions, sources
# after the question, "Source n (title)" labels, one source only): this layout had the highest
# token-F1 (0.24 vs 0.15-0.20) and the most valid citation markers; see README, "Answer quality".
INSTRUCTION = (
    "Answer the question in one or two sentences using only the sources. Cite the source number like [1]."
)


def without_markers(text: str) -> str:
    """``text`` without bracketed numbers (``[2]``, footnote marks common on web pages), whitespace
    collapsed: in the prompt, ``[n]`` must only ever mean "source n", or the model copies a page's
    footnote mark and it reads as a citation."""
    return " ".join(MARKER.sub(" ", text).split())


def source_excerpt(chunk: RetrievedChunk, max_chars: int) -> str:
    """The chunk's text without bracketed numbers, whitespace collapsed, cut to at most
    ``max_chars`` characters at a word boundary (with "…")."""
    text = without_markers(chunk.text)
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " …"


def grounded_messages(question: str, sources: Sequence[RetrievedChunk], *, max_chars: int) -> list[dict]:
    """Chat messages (``[{"role", "content"}]``) for the model's chat template: one user message with
    the numbered sources (``[n] <source title>: <excerpt>``, ``n`` 1-based in the order given, each
    excerpt at most ``max_chars`` characters), the customer's ``question`` and the instruction. No
    system message: the model's template supplies its default one."""
    blocks = [
        f"[{n}] {without_markers(chunk.source_title)}: {source_excerpt(chunk, max_chars)}"
        for n, chunk in enumerate(sources, start=1)
    ]
    content = "Sources:\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question.strip()}\n{INSTRUCTION}"
    return [{"role": "user", "content": content}]
