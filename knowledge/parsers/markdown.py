"""Markdown parser (markdown-it-py, CommonMark): the Markdown source is the extracted text.

Top-level block tokens give the blocks: ``heading_open`` (level from the tag), and paragraphs, list
items, tables, code and quotes as paragraphs. Offsets come from each token's source line map.
"""

from __future__ import annotations

from markdown_it import MarkdownIt

from knowledge.parsers import Block, ParsedDocument, decode_text

_md = MarkdownIt("commonmark").enable("table")


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse UTF-8 Markdown; raises ``ParseError`` for bytes that are not UTF-8."""
    text = decode_text(data)
    line_starts = [0]
    for index, char in enumerate(text):
        if char == "\n":
            line_starts.append(index + 1)
    line_starts.append(len(text))

    def span(line_map: list[int]) -> tuple[int, int]:
        start = line_starts[line_map[0]]
        end = line_starts[min(line_map[1], len(line_starts) - 1)]
        segment = text[start:end]
        return start + (len(segment) - len(segment.lstrip())), start + len(segment.rstrip())

    blocks: list[Block] = []
    tokens = _md.parse(text)
    for index, token in enumerate(tokens):
        if token.map is None or token.nesting == -1:
            continue
        if token.type == "heading_open" and token.level == 0:
            start, end = span(token.map)
            # Cite the heading's words, not its '#' markers.
            inline = tokens[index + 1].content.strip()
            found = text.find(inline, start, end) if inline else -1
            if found >= 0:
                start, end = found, found + len(inline)
            blocks.append(Block("heading", start, end, int(token.tag[1])))
        elif token.level == 0 and token.type in {
            "paragraph_open", "fence", "code_block", "table_open", "blockquote_open", "html_block",
        }:
            blocks.append(Block("paragraph", *span(token.map)))
        elif token.type == "list_item_open" and _top_level_list_item(tokens, index):
            blocks.append(Block("paragraph", *span(token.map)))
    blocks = [b for b in blocks if b.end > b.start]
    title = next((text[b.start : b.end] for b in blocks if b.kind == "heading"), "")
    return ParsedDocument(title=title, text=text, blocks=blocks)


def _top_level_list_item(tokens, index: int) -> bool:
    """A list item directly inside a top-level list (nested items stay inside their parent)."""
    return tokens[index].level == 1
