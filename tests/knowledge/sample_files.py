"""Small, realistic knowledge-base files for the tests, built in code (no binary fixtures).

``pdf_bytes`` writes a minimal valid PDF by hand (one text stream per page, Helvetica, a correct
cross-reference table), since no PDF writer library is installed; ``docx_bytes`` uses python-docx.
"""

from __future__ import annotations

import io

RETURNS_MD = """# Returns policy

You can return any item within 30 days of delivery.

## Refunds

Refunds go back to the original payment method within 5 business days.

- The item must be unused
- Keep the receipt

## Exchanges

Exchanges for another size are free.
"""

SHIPPING_TXT = """Shipping times

Orders ship within two business days. Express orders placed before noon ship the same day.

International shipping
We ship to 40 countries.
Customs fees are paid by the buyer.
"""

WARRANTY_HTML = """<!doctype html>
<html>
<head><title>Warranty</title><script>var tracker = 'SECRET-TRACKING-ID';</script>
<style>p { color: red }</style></head>
<body>
<nav>Home | Shop | Cart</nav>
<h1>Warranty</h1>
<p>Every product has a <b>two-year</b> warranty.</p>
<script>document.write('injected by script');</script>
<h2>Claims</h2>
<ul><li>Email support with your order number.</li><li>Attach a photo of the fault.</li></ul>
<table><tr><th>Plan</th><th>Years</th></tr><tr><td>Basic</td><td>2</td></tr></table>
<footer>Copyright Example Store</footer>
</body>
</html>
"""

SCRIPTS_ONLY_HTML = (
    "<html><head><script src='app.js'></script></head>"
    "<body><div id='root'></div><script>renderApp('help center');</script></body></html>"
)

FAQ_CSV = (
    "question,answer,category\n"
    "How long does shipping take?,Orders arrive in 3 to 5 business days.,shipping\n"
    'Can I change my order?,"Yes, within one hour of placing it.",orders\n'
)

CARE_PDF_PAGES = [
    ["Care instructions", "Wash the jacket in cold water.", "Do not tumble dry."],
    ["Storage", "Keep the jacket in a dry place."],
]


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """A valid PDF 1.4 file: one page per item of ``pages``, each line of it a line of text.

    Objects: 1 catalog, 2 page tree, 3 font, then a page object and its content stream per page.
    The xref table records each object's byte offset, as the PDF reference (7.5.4) requires.
    """

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    number = 4
    for lines in pages:
        content = ("BT /F1 12 Tf 72 720 Td 14 TL\n" + "".join(f"({escape(line)}) Tj T*\n" for line in lines)
                   + "ET\n").encode("latin-1")
        page, stream = number, number + 1
        number += 2
        kids.append(page)
        objects[page] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                         b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % stream)
        objects[stream] = b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"
    objects[2] = (b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % kid for kid in kids)
                  + b"] /Count %d >>" % len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for key in sorted(objects):
        offsets[key] = len(out)
        out += b"%d 0 obj\n" % key + objects[key] + b"\nendobj\n"
    xref_offset = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[key] for key in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_offset)
    return bytes(out)


def docx_bytes() -> bytes:
    """An employee-handbook Word file: core title, Heading 1 and Heading 2 paragraphs, a table."""
    import docx

    document = docx.Document()
    document.core_properties.title = "Employee handbook"
    document.add_heading("Holidays", level=1)
    document.add_paragraph("Staff get 25 days of paid leave a year.")
    document.add_heading("Booking leave", level=2)
    document.add_paragraph("Book leave in the HR portal two weeks ahead.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Years of service", "Extra days"
    table.cell(1, 0).text, table.cell(1, 1).text = "5", "2"
    document.add_paragraph("")  # empty paragraphs are skipped
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def good_files() -> dict[str, bytes]:
    """One valid file per supported type, by file name."""
    return {
        "returns.md": RETURNS_MD.encode(),
        "shipping.txt": SHIPPING_TXT.encode(),
        "warranty.html": WARRANTY_HTML.encode(),
        "care.pdf": pdf_bytes(CARE_PDF_PAGES),
        "handbook.docx": docx_bytes(),
        "store_faq.csv": FAQ_CSV.encode(),
    }
