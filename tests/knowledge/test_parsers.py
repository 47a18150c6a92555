"""Parsers: each file type on a small realistic input gives exact text, title and blocks; bad input
raises ``ParseError`` with the reason an admin sees."""

from __future__ import annotations

import io

import pytest

from knowledge.parsers import Block, ParseError, parse_file
from tests.knowledge.sample_files import (
    CARE_PDF_PAGES,
    FAQ_CSV,
    RETURNS_MD,
    SCRIPTS_ONLY_HTML,
    SHIPPING_TXT,
    WARRANTY_HTML,
    docx_bytes,
    pdf_bytes,
)

SUPPORTED = ".txt, .text, .md, .markdown, .html, .htm, .pdf, .docx, .csv"


def blocks_as_text(document) -> list[tuple[str, int, str]]:
    return [(b.kind, b.level, document.text[b.start : b.end]) for b in document.blocks]


def test_markdown_source_is_the_text_and_headings_keep_their_level():
    # given a Markdown page with a title, two sections and a list
    # when it is parsed
    document = parse_file("returns.md", RETURNS_MD.encode())
    # then the Markdown source is the text, the title is the first heading, and the heading blocks
    # cite the heading words (not the '#' markers)
    assert document.text == RETURNS_MD
    assert document.title == "Returns policy"
    assert blocks_as_text(document) == [
        ("heading", 1, "Returns policy"),
        ("paragraph", 0, "You can return any item within 30 days of delivery."),
        ("heading", 2, "Refunds"),
        ("paragraph", 0, "Refunds go back to the original payment method within 5 business days."),
        ("paragraph", 0, "- The item must be unused"),
        ("paragraph", 0, "- Keep the receipt"),
        ("heading", 2, "Exchanges"),
        ("paragraph", 0, "Exchanges for another size are free."),
    ]
    assert document.blocks[0] == Block("heading", 2, 16, 1)


def test_markdown_byte_order_mark_is_dropped_and_offsets_stay_exact():
    # given a UTF-8 Markdown file saved with a byte-order mark
    document = parse_file("returns.md", b"\xef\xbb\xbf" + RETURNS_MD.encode())
    # then the text has no BOM and the offsets point into it
    assert document.text == RETURNS_MD
    assert document.text[document.blocks[0].start : document.blocks[0].end] == "Returns policy"


def test_text_headings_are_short_lines_that_open_a_paragraph_group():
    # given a plain-text help page (headings on lines of their own)
    document = parse_file("shipping.txt", SHIPPING_TXT.encode())
    # then the file is the text, the first heading is level 1 and later ones level 2
    assert document.text == SHIPPING_TXT
    assert document.title == "Shipping times"
    assert blocks_as_text(document) == [
        ("heading", 1, "Shipping times"),
        ("paragraph", 0, "Orders ship within two business days. Express orders placed before noon ship the same day."),
        ("heading", 2, "International shipping"),
        ("paragraph", 0, "We ship to 40 countries."),
        ("paragraph", 0, "Customs fees are paid by the buyer."),
    ]


def test_text_without_heading_takes_its_title_from_the_file_name():
    # given a text file that is only prose
    document = parse_file("opening_hours.txt", b"We are open from 9 am to 5 pm, Monday to Friday.\n")
    # then the title comes from the file name
    assert document.title == "opening hours"
    assert blocks_as_text(document) == [("paragraph", 0, "We are open from 9 am to 5 pm, Monday to Friday.")]


def test_html_keeps_visible_text_and_drops_scripts_styles_and_chrome():
    # given a page with a script in the head and one in the body, a style, nav and footer
    document = parse_file("warranty.html", WARRANTY_HTML.encode())
    # then only the visible content is kept, table rows as "cell | cell"
    assert document.title == "Warranty"
    assert document.text == (
        "Warranty\n\nEvery product has a two-year warranty.\n\nClaims\n\n"
        "Email support with your order number.\n\nAttach a photo of the fault.\n\n"
        "Plan | Years\n\nBasic | 2"
    )
    assert blocks_as_text(document) == [
        ("heading", 1, "Warranty"),
        ("paragraph", 0, "Every product has a two-year warranty."),
        ("heading", 2, "Claims"),
        ("paragraph", 0, "Email support with your order number."),
        ("paragraph", 0, "Attach a photo of the fault."),
        ("paragraph", 0, "Plan | Years"),
        ("paragraph", 0, "Basic | 2"),
    ]
    for hidden in ["SECRET-TRACKING-ID", "injected by script", "color", "Home | Shop", "Copyright"]:
        assert hidden not in document.text


def test_html_page_with_one_main_element_is_read_from_it_alone():
    # given a web page with a site header, a role="navigation" menu, a sidebar and its main content
    page = (b"<html><head><title>Returns | Store</title></head><body>"
            b"<header><p>Store logo and search</p></header>"
            b"<div role='navigation'><ul><li>Home</li><li>Shop</li></ul></div>"
            b"<aside><p>Sale: 20% off tents</p></aside>"
            b"<main><h1>Returns</h1><p>Return any item within 30 days.</p></main>"
            b"<footer>Copyright</footer></body></html>")
    # when it is parsed
    document = parse_file("returns.html", page)
    # then only the main content is text
    assert (document.title, document.text) == ("Returns | Store", "Returns\n\nReturn any item within 30 days.")
    # and a page with two <main> elements (invalid, but seen) is read whole, without the menu
    two = page.replace(b"<aside>", b"<main>").replace(b"</aside>", b"</main>")
    assert parse_file("returns.html", two).text == (
        "Store logo and search\n\nSale: 20% off tents\n\nReturns\n\nReturn any item within 30 days.")


def test_html_with_only_scripts_fails_with_a_reason():
    # given a page rendered entirely by JavaScript
    # when it is parsed, then it is refused with the reason
    with pytest.raises(ParseError) as raised:
        parse_file("app.html", SCRIPTS_ONLY_HTML.encode())
    assert str(raised.value) == (
        "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)"
    )


def test_html_without_declared_charset_must_be_utf8_but_a_declared_charset_is_honoured():
    # given the same Latin-1 bytes, once without and once with a charset declaration
    body = "<p>Caf\u00e9 opening hours are 8 to 6.</p>".encode("latin-1")
    # then the undeclared page is refused, the declared one decoded
    with pytest.raises(ParseError) as raised:
        parse_file("cafe.html", b"<html><body>" + body + b"</body></html>")
    assert str(raised.value) == (
        "the file is not valid UTF-8 text (byte 0xe9 at offset 18); save it as UTF-8 and upload it again"
    )
    declared = b'<html><head><meta charset="latin-1"></head><body>' + body + b"</body></html>"
    assert parse_file("cafe.html", declared).text == "Caf\u00e9 opening hours are 8 to 6."


def test_pdf_text_layer_of_every_page_with_headings():
    # given a two-page PDF written by hand (one text stream per page)
    document = parse_file("care.pdf", pdf_bytes(CARE_PDF_PAGES))
    # then each line is a block; the first page's heading is level 1, a later page's level 2
    assert document.title == "Care instructions"
    assert document.text == (
        "Care instructions\n\nWash the jacket in cold water.\n\nDo not tumble dry.\n\n"
        "Storage\n\nKeep the jacket in a dry place."
    )
    assert blocks_as_text(document) == [
        ("heading", 1, "Care instructions"),
        ("paragraph", 0, "Wash the jacket in cold water."),
        ("paragraph", 0, "Do not tumble dry."),
        ("heading", 2, "Storage"),
        ("paragraph", 0, "Keep the jacket in a dry place."),
    ]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"%PDF-1.4\nthis is not a pdf at all\n", "corrupt or unreadable PDF (Stream has ended unexpectedly)"),
        (pdf_bytes(CARE_PDF_PAGES)[:60], "corrupt or unreadable PDF (Stream has ended unexpectedly)"),
        (pdf_bytes([[]]), "the PDF has no text layer (scanned images are not supported)"),
    ],
    ids=["garbage", "truncated", "no-text-layer"],
)
def test_bad_pdf_fails_with_a_reason(data, reason):
    # given a PDF that is corrupt, cut short, or has no text layer
    with pytest.raises(ParseError) as raised:
        parse_file("manual.pdf", data)
    # then the reason says so
    assert str(raised.value) == reason


def test_docx_headings_paragraphs_and_table_rows():
    # given a Word file written with python-docx (Heading 1/2 styles and a table)
    document = parse_file("handbook.docx", docx_bytes())
    # then the core title is the title, headings keep their level, table rows become "cell | cell"
    assert document.title == "Employee handbook"
    assert blocks_as_text(document) == [
        ("heading", 1, "Holidays"),
        ("paragraph", 0, "Staff get 25 days of paid leave a year."),
        ("heading", 2, "Booking leave"),
        ("paragraph", 0, "Book leave in the HR portal two weeks ahead."),
        ("paragraph", 0, "Years of service | Extra days"),
        ("paragraph", 0, "5 | 2"),
    ]
    assert document.text == (
        "Holidays\n\nStaff get 25 days of paid leave a year.\n\nBooking leave\n\n"
        "Book leave in the HR portal two weeks ahead.\n\nYears of service | Extra days\n\n5 | 2"
    )


def test_corrupt_docx_fails_with_a_reason():
    with pytest.raises(ParseError) as raised:
        parse_file("handbook.docx", b"PK\x03\x04 this is not really a zip file")
    assert str(raised.value) == "corrupt or unreadable Word document (File is not a zip file)"


def test_csv_faq_each_row_is_one_faq_block():
    # given an FAQ sheet with question, answer and an extra column
    document = parse_file("store_faq.csv", FAQ_CSV.encode())
    # then each row is one "question\nanswer" block and other columns are ignored
    assert document.title == "store faq"
    assert blocks_as_text(document) == [
        ("faq", 0, "How long does shipping take?\nOrders arrive in 3 to 5 business days."),
        ("faq", 0, "Can I change my order?\nYes, within one hour of placing it."),
    ]


def test_csv_faq_semicolon_delimited_with_short_column_names():
    # given a spreadsheet export with ';' and columns "Q"/"A", and a row without an answer
    data = "Q;A\nDo you ship to Canada?;Yes, in 7 days.\nIs gift wrap free?;\n".encode()
    document = parse_file("faq.csv", data)
    # then the row without an answer is skipped
    assert blocks_as_text(document) == [("faq", 0, "Do you ship to Canada?\nYes, in 7 days.")]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"name,email\nAnn,ann@example.com\n",
         "a CSV FAQ sheet needs a 'question' column and an 'answer' column; found columns: 'name', 'email'"),
        (b"question,answer\nWhat is the return window?,\n",
         "the CSV FAQ sheet has no rows with both a question and an answer"),
        (b"question,answer\nO\xf9 livrez-vous ?,Partout.\n",
         "the file is not valid UTF-8 text (byte 0xf9 at offset 17); save it as UTF-8 and upload it again"),
    ],
    ids=["no-columns", "no-rows", "not-utf8"],
)
def test_bad_csv_faq_fails_with_a_reason(data, reason):
    with pytest.raises(ParseError) as raised:
        parse_file("faq.csv", data)
    assert str(raised.value) == reason


@pytest.mark.parametrize(
    "filename, data, reason",
    [
        ("empty.md", b"", "the file is empty"),
        ("blank.txt", b"  \n\n \t\n", "the file is empty"),
        ("setup.exe", b"MZ\x90\x00", f"unsupported file type .exe; supported: {SUPPORTED}"),
        ("README", b"hello", f"unsupported file type (no extension); supported: {SUPPORTED}"),
        ("heading_only.md", b"# Only a heading\n", "no text could be extracted from the file"),
        ("latin1.txt", "Caf\u00e9 hours".encode("latin-1"),
         "the file is not valid UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8 and upload it again"),
    ],
    ids=["empty", "whitespace", "unsupported", "no-extension", "heading-only", "not-utf8"],
)
def test_parse_file_refuses_bad_input_with_a_reason(filename, data, reason):
    with pytest.raises(ParseError) as raised:
        parse_file(filename, data)
    assert str(raised.value) == reason


def test_parse_file_picks_the_parser_by_extension_case_insensitively():
    # given a Markdown file with an upper-case extension
    document = parse_file("RETURNS.MD", io.BytesIO(RETURNS_MD.encode()).getvalue())
    # then it is parsed as Markdown
    assert document.blocks[0] == Block("heading", 2, 16, 1)
