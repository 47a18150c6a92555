"""HTML parser (BeautifulSoup): visible text of headings, paragraphs, list items, table rows and
definition lists. Scripts, styles, templates, forms and navigation chrome (``<nav>``, ``<footer>``,
``role="navigation"``) are removed first, so their contents never reach the knowledge base; a page
with one ``<main>`` element (or ``role="main"``, as web pages mark their main content) is read from
it alone, leaving out site headers and sidebars."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup

from knowledge.parsers import ParsedDocument, ParseError, TextBuilder, decode_text

_DROP = ["script", "style", "noscript", "template", "iframe", "object", "embed", "svg", "canvas",
         "form", "nav", "footer", "head"]
_DECLARED_CHARSET = re.compile(rb"<meta[^>]+charset|encoding=", re.IGNORECASE)
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCKS = _HEADINGS | {"p", "li", "tr", "pre", "blockquote", "dt", "dd", "caption", "figcaption",
                       "div", "section", "article", "main", "td", "th"}


def parse(data: bytes, filename: str) -> ParsedDocument:
    """Parse an HTML page; raises ``ParseError`` if it has no visible text (for example a page
    rendered entirely by JavaScript) or is not UTF-8 without declaring another charset."""
    if _DECLARED_CHARSET.search(data[:4096]):
        soup = BeautifulSoup(data, "html.parser")
    else:  # no declared charset: HTML5 says UTF-8, and anything else is refused clearly
        soup = BeautifulSoup(decode_text(data), "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    had_scripts = bool(soup.find_all("script"))
    for tag in soup.find_all(_DROP):
        tag.decompose()
    for tag in soup.find_all(attrs={"role": "navigation"}):
        tag.decompose()
    builder = TextBuilder(title)
    mains = soup.find_all("main") or soup.find_all(attrs={"role": "main"})
    body = mains[0] if len(mains) == 1 else (soup.body or soup)
    for element in body.find_all(list(_BLOCKS)):
        # A table row is one block ("cell | cell"); it contains td/th blocks, so it is handled
        # before the leaf rule below, and what is inside a row contributes through the row.
        if element.name == "tr":
            cells = [" ".join(c.get_text(" ", strip=True).split())
                     for c in element.find_all(["td", "th"], recursive=False)]
            builder.add("paragraph", " | ".join(c for c in cells if c))
            continue
        if element.find_parent("tr") is not None:
            continue
        # Leaf blocks only: a block containing other blocks contributes through them.
        if element.find(list(_BLOCKS)) is not None:
            continue
        text = " ".join(element.get_text(" ", strip=True).split())
        if element.name in _HEADINGS:
            builder.add("heading", text, int(element.name[1]))
        else:
            builder.add("paragraph", text)
    if not builder.blocks:
        reason = "the page has no visible text"
        if had_scripts:
            reason += " once its scripts are removed (is it rendered by JavaScript?)"
        raise ParseError(reason)
    return builder.build()
