"""The groundedness check between the model and the customer: no sentence is shown unless its
sources support it and every hard fact in it appears in them.

For each sentence the model writes (``GroundingCheck.check``):

1. **Form**: a sentence that is a question, restates the customer's question, or has fewer than
   ``min_words`` content words is not an answer: removed.
2. **Hard facts** (``hard_facts``): URLs, e-mail addresses, phone numbers, numbers with their units
   (money, durations, weights...), month names and SKU-like codes must appear in the prompt's sources,
   after normalisation (``$5.95`` and ``5.95 dollars`` are the same fact; ``three days`` is
   ``3 day``); a number stated with a unit must appear with that unit. Otherwise removed.
3. **Support**: the sentence must be supported by the source it cites (or, when it cites none or
   the wrong one, by another prompt source, which it is then cited to): at least ``min_coverage`` of
   its content words (Snowball-stemmed) appear in two adjacent sentences of that source (with its
   title; a question in the source asserts nothing and lends no words), and its embedding (the product's
   sentence-embedding model) has cosine similarity >= ``min_similarity`` with the source's closest
   sentence. Lexical coverage catches invented content the embedding finds "similar"; similarity
   catches word salad built from the source's words.

Then, over the answer (``GroundingCheck.addresses``): what is shown must address the question: the
kind of answer it asks for (``answer_type``: an amount, a duration, a time, a count, a contact, a
weight, size, capacity or rating) must be present, and the shown text's cosine similarity to the question must reach ``min_relevance``.

The same measurements are the field's standard cheap groundedness signals (lexical overlap as in
ALCE's post-hoc citation, Gao et al. 2023; embedding similarity as in RAGAS-style faithfulness
scoring); Galileo's Luna replaces them with a small evaluator model, which no package here ships.
Thresholds are settings chosen by measurement (``benchmarks/grounding_thresholds.py``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from chat.citations import MARKER, marker_numbers

Encoder = Callable[[list[str]], np.ndarray]

# --- text units --------------------------------------------------------------------------------------

# A sentence ends at . ! ? (not inside a number such as 5.95 or an abbreviation-free URL) followed by
# space, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s*\[\s*\d{1,3}(?:\s*,\s*\d{1,3})*\s*\])*\s+(?=\S)|\n+")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOPWORDS = frozenset(
    "a about above after again all also am an and any are as at be because been before being below between both "
    "but by can could did do does doing down during each few for from further had has have having he her here "
    "hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or "
    "other our ours out over own same she should so some such than that the their theirs them then there these "
    "they this those through to too under until up very was we were what when where which while who whom why "
    "will with would you your yours may must might shall us".split()
)


# Words that end with a full stop without ending a sentence ("Tidewater Trail Co. ships...").
_ABBREVIATION = re.compile(r"(?i)(?:^|\s)(?:co|inc|ltd|corp|st|mr|mrs|ms|dr|jr|sr|no|vs|etc|e\.g|i\.e|u\.s|a\.m|p\.m|[a-z])\.$")


def ends_with_abbreviation(text: str) -> bool:
    """Whether ``text`` ends with an abbreviation's full stop (``Co.``, ``e.g.``, ``U.S.``) rather
    than a sentence's."""
    return bool(_ABBREVIATION.search(text.rstrip()))


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences (stripped, non-empty), each keeping the citation markers that
    follow its final punctuation (``"Yes. [1] No."`` -> ``["Yes. [1]", "No."]``); a full stop after
    an abbreviation (``Co.``) ends no sentence."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if ends_with_abbreviation(text[start:match.start()]) and not text[match.start():match.end()].count("\n"):
            continue
        segment = text[start:match.end()].strip()
        if segment:
            pieces.append(segment)
        start = match.end()
    rest = text[start:].strip()
    if rest:
        pieces.append(rest)
    return pieces


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


_stem_lock = threading.Lock()


def stems(text: str) -> list[str]:
    """Snowball stems of ``text``'s content words (lower case; no citation markers, no function
    words, no bare single digits)."""
    words = [w for w in _WORD.findall(MARKER.sub(" ", text).lower()) if w not in _STOPWORDS]
    words = [w for w in words if len(w) > 1]
    with _stem_lock:  # snowballstemmer's stemmer objects keep state between calls
        return _stemmer().stemWords(words)


# --- hard facts ---------------------------------------------------------------------------------------

_URL = re.compile(
    r"(?i)\b(?:https?://|www\.)[^\s<>()\[\]{}\"']+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|org|net|gov|edu|io|co|uk|us|ca|eu|info|biz|example|html?)\b(?:/[^\s<>()\[\]{}\"']*)?"
)
_EMAIL = re.compile(r"(?i)\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w.])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]\d{3}[\s.-]\d{4}(?![\w])|\b1-\d{3}-[A-Z0-9-]{7,}\b")
_SKU = re.compile(r"\b[A-Z]{2,}(?:-[A-Z0-9]+)+\b")
_MONEY = re.compile(r"[$€£]\s?(\d+(?:[.,]\d+)*)")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)(?:\s*(%)|(?=[^\w]|$)|(?=[a-zA-Z]))")
_MONTHS = ("january february march april may june july august september october november december").split()
_MONTH = re.compile(r"\b(" + "|".join(m.capitalize() for m in _MONTHS) + r")\b")
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}
_NUMBER_WORD = re.compile(r"(?i)\b(" + "|".join(_NUMBER_WORDS) + r")\b")


def number_words_as_digits(text: str) -> str:
    """``text`` with number words written as digits ("three-season" -> "3-season")."""
    return _NUMBER_WORD.sub(lambda m: str(_NUMBER_WORDS[m.group(1).lower()]), text)
# Unit words after a number, normalised (plural and abbreviations folded). Qualifiers between the
# number and its unit ("5 business days") are skipped.
_UNITS = {
    "second": "second", "sec": "second", "minute": "minute", "min": "minute", "hour": "hour", "hr": "hour",
    "day": "day", "week": "week", "month": "month", "year": "year", "yr": "year",
    "dollar": "dollar", "usd": "dollar", "cent": "cent", "euro": "euro", "pound": "pound", "percent": "percent",
    "%": "percent", "kg": "kg", "kilogram": "kg", "g": "g", "gram": "g", "lb": "lb", "oz": "oz", "m": "m",
    "meter": "m", "metre": "m", "cm": "cm", "mm": "mm", "km": "km", "mile": "mile", "foot": "foot", "feet": "foot",
    "ft": "foot", "inch": "inch", "point": "point", "time": "time", "people": "person", "person": "person",
}
_QUALIFIERS = frozenset("business calendar working full consecutive more extra additional".split())


def _number(text: str) -> str:
    """A number as a canonical string: thousands separators dropped, trailing ``.0`` removed."""
    text = text.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", text) else text.replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else f"{value:g}"


_UNIT_AFTER = re.compile(r"\s*(?:-\s*)?([A-Za-z]+|%)(?:\s+([A-Za-z]+))?(?:\s+([A-Za-z]+))?")


def _unit_after(text: str, end: int) -> str | None:
    """The normalised unit written right after a number ending at ``end`` (qualifiers such as
    "business" may stand between them), or ``None``."""
    match = _UNIT_AFTER.match(text, end)
    for word in (match.groups() if match else ()):
        if word is None:
            return None
        word = word.lower()
        singular = word[:-1] if word.endswith("s") and word[:-1] in _UNITS else word
        if singular in _UNITS:
            return _UNITS[singular]
        if word not in _QUALIFIERS:
            return None
    return None


@dataclass(frozen=True)
class Facts:
    """The hard facts of a text, normalised: ``urls`` (lower case, no scheme, ``www.`` or trailing
    ``/`` and punctuation), ``emails``, ``phones`` (digits only), ``numbers`` (canonical strings, see
    ``_number``), ``quantities`` ((number, unit) pairs), ``months`` and ``codes`` (SKU-like)."""

    urls: frozenset = frozenset()
    emails: frozenset = frozenset()
    phones: frozenset = frozenset()
    numbers: frozenset = frozenset()
    quantities: frozenset = frozenset()
    months: frozenset = frozenset()
    codes: frozenset = frozenset()

    def missing_from(self, available: "Facts") -> list[str]:
        """The facts of this text that ``available`` lacks, as readable strings (empty: all present)."""
        missing = [f"link {u}" for u in sorted(self.urls) if not any(u == a or a.startswith(u) or u.startswith(a + "/")
                                                                    for a in available.urls)]
        missing += [f"e-mail {e}" for e in sorted(self.emails - available.emails)]
        missing += [f"phone {p}" for p in sorted(self.phones - available.phones)]
        missing += [f"number {n}" for n in sorted(self.numbers - available.numbers)]
        missing += [f"quantity {n} {u}" for n, u in sorted(self.quantities - available.quantities)
                    if n in available.numbers]
        missing += [f"month {m}" for m in sorted(self.months - available.months)]
        missing += [f"code {c}" for c in sorted(self.codes - available.codes)]
        return missing


def _url_key(url: str) -> str:
    url = re.sub(r"(?i)^(https?://)?(www\.)?", "", url.rstrip(".,;:!?)'\"")).lower()
    return url.rstrip("/")


def hard_facts(text: str) -> Facts:
    """The hard facts of ``text`` (see ``Facts``). Citation markers are not facts."""
    text = MARKER.sub(" ", text)
    emails = {e.lower().rstrip(".") for e in _EMAIL.findall(text)}
    scrubbed = _EMAIL.sub(" ", text)
    urls = {_url_key(u) for u in _URL.findall(scrubbed)}
    scrubbed = _URL.sub(" ", scrubbed)
    phones = {re.sub(r"\D", "", p) for p in _PHONE.findall(scrubbed)}
    scrubbed = _PHONE.sub(" ", scrubbed)
    codes = set(_SKU.findall(scrubbed))
    scrubbed = _SKU.sub(" ", scrubbed)
    numbers, quantities = set(), set()
    for match in _MONEY.finditer(scrubbed):
        value = _number(match.group(1))
        numbers.add(value)
        quantities.add((value, "dollar" if match.group(0)[0] == "$" else "money"))
    scrubbed = _MONEY.sub(lambda m: " " + m.group(1) + " ", scrubbed)
    scrubbed = number_words_as_digits(scrubbed)
    for match in _NUMBER.finditer(scrubbed):
        value = _number(match.group(1))
        numbers.add(value)
        unit = "percent" if match.group(2) else _unit_after(scrubbed, match.end(1))
        if unit:
            quantities.add((value, unit))
    months = {m.lower() for m in _MONTH.findall(text)}
    # "May" is also a verb: only count it next to a number ("May 5", "5 May").
    if "may" in months and not re.search(r"\bMay\s+\d|\d\s+May\b", text):
        months.discard("may")
    return Facts(frozenset(urls), frozenset(emails), frozenset(phones), frozenset(numbers),
                 frozenset(quantities), frozenset(months), frozenset(codes))


def merge_facts(facts: Sequence[Facts]) -> Facts:
    """The union of several texts' facts."""
    return Facts(*(frozenset().union(*(getattr(f, name) for f in facts)) for name in Facts.__dataclass_fields__))


# --- what the question asks for ------------------------------------------------------------------------

# Checked in order: "how much does it weigh" asks for a weight, not an amount. A measure is asked for by
# kind (weight, size, capacity, rating), each answered only by its own units: "How much does the tent
# weigh?" is not answered by "A two-person tent" (a capacity).
_ASKS = (
    ("contact", re.compile(r"(?i)\b(phone|telephone|call|number to|e-?mail|website|web site|url|link|address)\b")),
    ("weight", re.compile(r"(?i)\b(how heavy|weigh|weighs|weight)\b")),
    ("size", re.compile(r"(?i)\b(how (big|large|tall|wide)|size of|dimensions|length of|height of|how high)\b")),
    ("capacity", re.compile(r"(?i)\b(capacity|how many (people|persons)|sleeps? how many|carry how much)\b")),
    ("rating", re.compile(r"(?i)\b(how warm|temperature|rating|rated)\b")),
    ("amount", re.compile(r"(?i)\b(how much|cost|costs|price|prices|fee|fees|charge|charges|deduct|pay for|"
                          r"refund amount|rate for)\b")),
    ("duration", re.compile(r"(?i)\bhow (long|many (days|weeks|months|years|hours|minutes))\b|\bwithin how\b")),
    ("frequency", re.compile(r"(?i)\bhow often\b|\bhow many times (a|per|each|every)\b")),
    ("count", re.compile(r"(?i)\bhow many\b|^\W*what(?:'s|\s+is)?\s+(?:the\s+)?(?:minimum\s+|maximum\s+|top\s+)?"
                         r"(credit score|gpa|grade point average|speed|top speed|age limit)\b")),
    ("time", re.compile(r"(?i)\b(when|what time|which days?|what days?|opening hours|hours)\b")),
)
_DURATION_UNITS = frozenset("second minute hour day week month year".split())
_AMOUNT_UNITS = frozenset("dollar money cent euro pound percent point".split())
# The units that answer each kind of measure (normalised as in ``_UNITS``).
_MEASURE_UNITS = {
    "weight": frozenset("kg g lb oz pound".split()),
    "size": frozenset("m cm mm km mile foot inch".split()),
    "capacity": frozenset("person kg lb".split()),
}
# A rating may be in any unit of measure ("20,000 mm" of waterproofing) or in points, or in degrees,
# seasons or fill power (matched in the text).
_MEASURE_UNITS["rating"] = frozenset().union(*_MEASURE_UNITS.values()) - {"pound"} | {"point"}
_DAY_NAMES = re.compile(r"(?i)\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekday|weekend|daily|"
                        r"today|tomorrow|immediately|same day|before|after|until|within|once|as soon as)\b")


# A question that asks for the value of a sum ("What is the annual deductible for Medicare Part B?",
# "What's the maximum Pell Grant...?", "What percentage of my income...?"): it opens with "what" and
# names a sum of money or a rate, or a maximum / minimum / average of one. Only such questions: "Can I
# get a waiver so I don't have to pay the premiums?" mentions a premium but asks yes or no.
_ASKS_VALUE = re.compile(r"(?i)^\W*(?:(?:and|so|ok|okay|then|also|but|well)\W+)*what(?:'s|\s+is|\s+are|\s+was|\s+would|\s+will)?\b")
_SUM = re.compile(r"(?i)\b(premiums?|deductibles?|co-?pays?|tuition|allowance|interest rates?|percentage|percent|"
                  r"income limits?|earnings? limits?|maximum amount|minimum amount)\b"
                  r"|\b(maximum|minimum|most|highest|lowest|average|monthly|annual|yearly|weekly)\b(?:\s+[\w-]+){0,3}?\s+"
                  r"(pay|pays|payment|benefits?|grant|amount|loan|earnings?|income|salary|premium)\b")


def answer_type(question: str) -> str | None:
    """What ``question`` asks for: ``"contact"``, ``"amount"``, ``"duration"``, ``"frequency"``
    (how often: answered by a time unit or "once", "every", "annually"...), ``"count"`` (a number,
    also "what credit score / GPA / top speed"),
    ``"time"``, ``"weight"``, ``"size"``, ``"capacity"``, ``"rating"`` (a temperature or season
    rating), or ``None`` (a yes/no, a how-to, an explanation: any statement can answer it). A "what"
    question naming a sum ("What is the annual deductible...?", "What's the maximum Pell Grant...?")
    asks for an amount."""
    for name, pattern in _ASKS:
        if pattern.search(question):
            return name
    if _ASKS_VALUE.search(question) and _SUM.search(question):
        return "amount"
    return None


# A how-to question: "How do I make a warranty claim?", "how can I apply", "what steps do I take to...".
_HOW_TO = re.compile(r"(?i)\bhow (do|can|could|should|would|must) (i|we|you|one|my|our)\b|\bhow to\b|"
                     r"\bwhat (do|should|must) (i|we) (need to )?do\b|\b(steps|procedure|process) (to|for)\b|"
                     r"\bwhere (do|can|should) (i|we) (go|send|apply|sign|file|submit|report)\b")
# Verbs that open an instruction ("Email warranty@...", "Start a return from the Orders page"): common
# verbs of procedures in support and public-service pages.
_INSTRUCTION_VERBS = frozenset(
    "apply ask attach bring call check choose click complete contact create download e email enter file fill find "
    "follow get give go include keep log mail make notify open pay phone print provide read register report request "
    "return see select send ship sign start submit take tell text upload use visit wash write".split())
# Second-person instructions ("you can...", "you need to...") and purpose clauses ("To renew, go to...").
_INSTRUCTION = re.compile(r"(?i)\b(you (can|may|must|should|need to|have to|will need to|are required to)|please)\b"
                          r"|^\s*to [a-z]+\b[^.;]*,")
_FIRST_WORD = re.compile(r"[\s*•\-–]*(?:\d{1,2}[.)]\s*)?([A-Za-z]+)(-?mail)?\b")  # after a list bullet or number
# ...unless that word is the subject: a verb follows within two words ("Return labels cost...").
_SUBJECT_FIRST = re.compile(r"(?i)^\W*[a-z-]+(?:\s+[a-z-]+)?\s+(is|are|was|were|has|have|had|can|could|will|would|"
                            r"may|might|must|should|does|do|did|takes?|costs?|needs?)\b")


def asks_how_to(question: str) -> bool:
    """Whether ``question`` asks how to do something ("How do I make a warranty claim?"): answered by
    an instruction (``gives_instruction``) rather than by any true statement on the topic."""
    return bool(_HOW_TO.search(question)) and answer_type(question) is None


def gives_instruction(sentence: str, facts: Facts | None = None) -> bool:
    """Whether ``sentence`` tells the reader what to do: it opens with a verb of procedure (an
    imperative: "Email warranty@... with your order number"), addresses the reader ("you can start a
    return from..."), opens with a purpose clause ("To renew, go to..."), or gives a link, e-mail
    address or phone number to use."""
    first = _FIRST_WORD.match(sentence)
    if first and first.group(1).lower() in _INSTRUCTION_VERBS and not _SUBJECT_FIRST.match(sentence):
        return True
    if _INSTRUCTION.search(sentence):
        return True
    facts = facts or hard_facts(sentence)
    return bool(facts.urls or facts.emails or facts.phones)


def has_answer_type(text: str, kind: str | None, facts: Facts | None = None) -> bool:
    """Whether ``text`` holds the kind of answer ``kind`` names (see ``answer_type``): an amount needs
    money, a percentage or the words free / no cost; a duration a number with a time unit (or words like
    "same day"); a count a number; a time a number, a month, a day name or a relative time; a contact
    a link, e-mail address or phone number; a weight, size or capacity a number with one of that
    measure's units (``_MEASURE_UNITS``); a rating any unit of measure, degrees, seasons or fill
    power. ``None`` accepts anything."""
    if kind is None:
        return True
    facts = facts or hard_facts(text)
    if kind == "contact":
        return bool(facts.urls or facts.emails or facts.phones)
    if kind == "amount":
        # money or a percentage: a bare number (a form number, an age) or a number of days is not an
        # amount (measured: bare numbers let 10 of 26 "how much" near-miss questions through)
        return (any(unit in _AMOUNT_UNITS for _, unit in facts.quantities)
                or bool(re.search(r"(?i)\b(free|no cost|no charge|at no|not charge)\b", text)))
    if kind == "duration":
        return any(unit in _DURATION_UNITS for _, unit in facts.quantities) or bool(
            re.search(r"(?i)\b(same day|immediately|lifetime|right away)\b", text))
    if kind == "count":
        return bool(facts.numbers)
    if kind == "frequency":
        return any(unit in _DURATION_UNITS for _, unit in facts.quantities) or bool(
            re.search(r"(?i)\b(once|twice|every|each (day|week|month|year)|annually|yearly|monthly|weekly|daily|"
                      r"per (day|week|month|year)|a (day|week|month|year))\b", text))
    if kind in _MEASURE_UNITS:
        return any(unit in _MEASURE_UNITS[kind] for _, unit in facts.quantities) or bool(
            kind == "rating" and re.search(r"°|\b\d+\s*-?\s*(season|fill)\b", number_words_as_digits(text)))
    if kind == "time":
        return bool(facts.numbers or facts.months or _DAY_NAMES.search(text))
    return True


# --- the check ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """The check's thresholds (see the module docstring): ``min_coverage`` share of content words
    (0..1), ``min_similarity`` cosine similarity (-1..1) sentence vs closest source sentence,
    ``min_relevance`` cosine similarity of the shown answer to the question, ``min_words`` content
    words of a sentence that can be shown."""

    min_coverage: float = 0.6
    min_similarity: float = 0.5
    min_relevance: float = 0.3
    min_words: int = 2

    @classmethod
    def from_settings(cls) -> "Thresholds":
        """The thresholds configured by ``GROUNDING_*`` settings."""
        from django.conf import settings

        return cls(min_coverage=settings.GROUNDING_MIN_COVERAGE, min_similarity=settings.GROUNDING_MIN_SIMILARITY,
                   min_relevance=settings.GROUNDING_MIN_RELEVANCE, min_words=settings.GROUNDING_MIN_WORDS)


@dataclass
class Verdict:
    """The check's decision on one sentence.

    ``text``: the sentence as it may be shown (markers renumbered to the supporting source when the
    model cited another one); ``original``: as the model wrote it; ``shown``: passed; ``reason``: why it
    was removed (``None`` when shown); ``source``: the 1-based prompt source supporting it;
    ``coverage`` (0..1) and ``similarity`` (cosine) against that source; ``recited``: the marker was
    changed or added by the check."""

    text: str
    original: str
    shown: bool
    reason: str | None = None
    source: int | None = None
    coverage: float = 0.0
    similarity: float = 0.0
    recited: bool = False

    def as_trace(self) -> dict:
        """The stored form: ``{"text", "shown", "reason", "source", "coverage", "similarity"}``."""
        return {"text": self.original, "shown": self.shown, "reason": self.reason, "source": self.source,
                "coverage": round(self.coverage, 3), "similarity": round(self.similarity, 3)}


@dataclass
class SourceView:
    """A prompt source as the check sees it: its text, sentences, their embeddings (unit vectors,
    ``(len(sentences), dim)``), stems (of the whole source with its title, per window of two
    adjacent sentences with the title, per sentence, and of the headings above the passage) and hard
    facts."""

    text: str
    sentences: list[str]
    vectors: np.ndarray
    stems: frozenset
    facts: Facts
    windows: list[frozenset] = field(default_factory=list)
    sentence_stems: list[frozenset] = field(default_factory=list)
    heading_stems: frozenset = frozenset()


def source_sentences(text: str) -> list[str]:
    """Sentences of a source passage for matching and extraction (lines and sentence ends; pieces of
    fewer than three words, such as headings, are merged into the next piece)."""
    out, carry = [], ""
    for line in text.splitlines():
        for piece in split_sentences(line):
            piece = (carry + " " + piece).strip() if carry else piece
            if len(piece.split()) < 3:
                carry = piece
                continue
            carry = ""
            out.append(piece)
    if carry:
        out.append(carry)
    return out


# The prompt lists sources as "[n] <title>: <excerpt>"; a sentence that starts with a marker or a list
# number, or holds "<title>:", is the model copying that layout ("[1] Shipping policy: ..."), not answering.
_LAYOUT_COPY = re.compile(r"^\s*(\[\s*\d{1,3}\s*\]|\d{1,2}\))")


class GroundingCheck:
    """Checks an answer's sentences against the prompt's sources (see the module docstring).

    ``question``: the customer's question; ``sources``: the prompt's source texts, ``[1]..[n]`` in
    order (the excerpts the model read); ``titles``: their titles (also read by the model: they count
    as support and as facts, but are never quoted); ``topic``: the text relevance is measured against
    (default the question; for a follow-up, the question with the earlier questions it refers to);
    ``prompt_sources``: how many of ``sources`` (the first ones) the model read: the model's sentences
    are checked against those only, while a quote may come from any (default all); ``headings``: the
    headings above each source's passage (``" > "``-joined, as ``RetrievedChunk.heading_path``), read
    only by the quote's ranking (``extractive_answer``: the section a sentence stands in);
    ``encode``: the sentence-embedding function (``texts -> float32 (n, dim)`` unit vectors; default
    the settings' embedding model, on which the thresholds were chosen, whichever retrieval version
    is active). Embeds the sources' sentences and the question once, at construction (one batch)."""

    def __init__(self, question: str, sources: Sequence[str], *, titles: Sequence[str] = (),
                 headings: Sequence[str] = (), topic: str | None = None, prompt_sources: int | None = None,
                 thresholds: Thresholds | None = None, encode: Encoder | None = None):
        self.question = question.strip()
        self.thresholds = thresholds or Thresholds.from_settings()
        if encode is None:
            # The settings' model, not the active retrieval version: the thresholds were chosen on it,
            # and a retriever fine-tuned on corrections (an embedding-version promotion) scores
            # sentence similarity on another scale.
            from knowledge.embedding import settings_encoder

            encode = settings_encoder().encode
        self.encode = encode
        split = [source_sentences(text) or [text] for text in sources]
        titles = list(titles) + [""] * (len(sources) - len(titles))
        headings = list(headings) + [""] * (len(sources) - len(headings))
        # Sentences are embedded alone: with their source's title before them (a contextual header)
        # token-F1 on Doc2Dial fell from 0.219 / 0.264 to 0.206 / 0.245 (tune / held-out halves).
        flat = [s for sentences in split for s in sentences]
        vectors = encode([(topic or self.question).strip(), *flat])
        self.question_vector = vectors[0]
        self.sources: list[SourceView] = []
        offset = 1
        for title, heading, text, sentences in zip(titles, headings, sources, split):
            title_stems = set(stems(title))
            per_sentence = [set(stems(sentence)) for sentence in sentences]
            # A question in a source asserts nothing, so its words support nothing: "What's the best time to
            # start your retirement benefits? We're not recommending that you start at age 62..." gave the
            # words of "The best time to start your retirement benefits is 62, not 70" (held-out Doc2Dial).
            asserted = [set() if sentence.rstrip().endswith("?") else words for sentence, words in zip(sentences, per_sentence)]
            windows = [frozenset(title_stems | asserted[i] | (asserted[i + 1] if i + 1 < len(sentences) else set()))
                       for i in range(len(sentences))]
            self.sources.append(SourceView(text, sentences, vectors[offset:offset + len(sentences)],
                                           frozenset(stems(f"{title} {text}")), hard_facts(f"{title}. {text}"),
                                           windows, [frozenset(p) for p in per_sentence],
                                           frozenset(stems(heading or ""))))
            offset += len(sentences)
        self.prompt_sources = len(self.sources) if prompt_sources is None else min(prompt_sources, len(self.sources))
        self.available = merge_facts([s.facts for s in self.sources[: self.prompt_sources]])
        self.titles = [t.strip() for t in titles if t]
        self.question_stems = set(stems(self.question))
        self.kind = answer_type(self.question)

    def _support(self, stemmed: list[str], vector: np.ndarray, index: int) -> tuple[float, float]:
        source = self.sources[index]
        # Coverage by the best window of two adjacent sentences, not by the whole passage: a sentence
        # that glues an invented clause onto a real one ("the card does not charge fees for ATM
        # withdrawals, as it is a debit card...") takes its extra words from nowhere near.
        windows = source.windows or [source.stems]
        coverage = max(sum(s in window for s in stemmed) for window in windows) / len(stemmed) if stemmed else 0.0
        similarity = float(np.max(source.vectors @ vector)) if len(source.vectors) else 0.0
        return coverage, similarity

    def check(self, sentence: str) -> Verdict:
        """The verdict on one sentence of the answer (markers included, as the model wrote it)."""
        t = self.thresholds
        body = " ".join(MARKER.sub(" ", sentence).split())
        stemmed = stems(body)
        if body.endswith("?"):
            return Verdict(sentence, sentence, False, "a question, not an answer")
        if len(stemmed) < t.min_words:
            return Verdict(sentence, sentence, False, "too short to check")
        if not set(stemmed) - self.question_stems:
            return Verdict(sentence, sentence, False, "restates the question")
        if _LAYOUT_COPY.match(sentence) or any(title.lower() + ":" in body.lower() for title in self.titles):
            return Verdict(sentence, sentence, False, "copies the list of sources, not an answer")
        missing = hard_facts(body).missing_from(self.available)
        if missing:
            return Verdict(sentence, sentence, False, "not in the sources: " + ", ".join(missing[:4]))
        if not self.prompt_sources:
            return Verdict(sentence, sentence, False, "no sources")
        vector = self.encode([body])[0]
        cited = [n for m in MARKER.finditer(sentence) for n in marker_numbers(m.group(1))
                 if 1 <= n <= self.prompt_sources]
        scores = {i + 1: self._support(stemmed, vector, i) for i in range(self.prompt_sources)}

        def passes(n: int) -> bool:
            coverage, similarity = scores[n]
            return coverage >= t.min_coverage and similarity >= t.min_similarity

        for n in dict.fromkeys(cited):
            if passes(n):
                return Verdict(sentence, sentence, True, None, n, *scores[n])
        best = max(scores, key=lambda n: (scores[n][0] + scores[n][1], -n))
        if passes(best):
            text = f"{body.rstrip()} [{best}]" if not body.endswith(tuple(".!")) else f"{body[:-1].rstrip()} [{best}]{body[-1]}"
            return Verdict(text, sentence, True, None, best, *scores[best], recited=True)
        coverage, similarity = scores[best]
        return Verdict(sentence, sentence, False,
                       f"not supported by the sources (coverage {coverage:.2f}, similarity {similarity:.2f})",
                       best, coverage, similarity)

    def relevance(self, text: str) -> float:
        """Cosine similarity of ``text`` (markers removed) to the question."""
        body = " ".join(MARKER.sub(" ", text).split())
        return float(self.encode([body])[0] @ self.question_vector) if body else 0.0

    def addresses(self, text: str) -> tuple[bool, str | None]:
        """Whether ``text`` addresses the question: ``(True, None)`` or ``(False, reason)``."""
        if not has_answer_type(text, self.kind):
            return False, f"does not give what the question asks for ({self.kind})"
        relevance = self.relevance(text)
        if relevance < self.thresholds.min_relevance:
            return False, f"beside the question (relevance {relevance:.2f})"
        return True, None


@dataclass
class ExtractiveAnswer:
    """An answer quoted from the sources: ``text`` (the quoted sentence and its marker), ``source``
    (1-based), ``relevance`` (cosine similarity to the question)."""

    text: str
    source: int
    relevance: float


def extractive_answer(check: GroundingCheck, *, min_relevance: float | None = None,
                      require_type: bool = True, lexical_weight: float | None = None,
                      context_weight: float | None = None,
                      instruction_weight: float | None = None) -> ExtractiveAnswer | None:
    """The source sentence that best answers the question, quoted and cited, or ``None`` when none is
    close enough.

    A sentence's score is its cosine similarity to the question (the product's embedding model; for a
    follow-up, to the question with its history) plus ``lexical_weight`` (default
    ``EXTRACTIVE_LEXICAL_WEIGHT``) times the share of the question's content words (stems) it
    contains, plus ``instruction_weight`` (default ``EXTRACTIVE_INSTRUCTION_WEIGHT``) when the
    question asks how to do something (``asks_how_to``) and the sentence gives an instruction
    (``gives_instruction``: "Email warranty@... with your order number" for "How do I make a warranty
    claim?"). In the share, a word found not in the sentence but in the headings above its passage
    (its section: "How to make a claim") counts ``context_weight`` (default
    ``EXTRACTIVE_CONTEXT_WEIGHT``, 0 to 1) of a word the sentence holds. Both were chosen on the tune
    half of Doc2Dial (``benchmarks/quote_ranking.py``; README, "Groundedness check"), where also
    counting the sentence before it scored lower, and weighting the question's words by their rarity
    among the sources' sentences or matching words by their embeddings ("shops" / "stores") changed
    nothing.
    Only sentences holding what the question asks for (``require_type``, see
    ``answer_type``) and reaching ``min_relevance`` cosine similarity (default the check's
    ``min_relevance``) qualify; questions (an FAQ entry's own), sentences cut short by the excerpt
    ("…") and sentences that only repeat the question's words never do. ``ExtractiveAnswer.text`` is
    ``"<sentence>" [n]``. Quoting two adjacent sentences when they scored higher was measured and
    lowered token-F1 on Doc2Dial (README, "Groundedness check")."""
    from django.conf import settings

    if lexical_weight is None:
        lexical_weight = settings.EXTRACTIVE_LEXICAL_WEIGHT
    if context_weight is None:
        context_weight = settings.EXTRACTIVE_CONTEXT_WEIGHT
    if instruction_weight is None:
        instruction_weight = settings.EXTRACTIVE_INSTRUCTION_WEIGHT
    limit = check.thresholds.min_relevance if min_relevance is None else min_relevance
    asked = check.question_stems
    how_to = instruction_weight > 0 and asks_how_to(check.question)
    best: tuple[float, float, int, str] | None = None
    for index, source in enumerate(check.sources):
        if not len(source.vectors):
            continue
        similarities = source.vectors @ check.question_vector
        for position, (sentence, similarity) in enumerate(zip(source.sentences, similarities)):
            sentence = sentence.strip()
            stemmed = source.sentence_stems[position] if source.sentence_stems else frozenset(stems(sentence))
            if (sentence.endswith(("?", "…")) or len(stemmed) < check.thresholds.min_words or similarity < limit
                    or stemmed <= asked):
                continue  # a question, a sentence cut by the excerpt, too short, too far, or the question again
            facts = hard_facts(sentence)
            if require_type and not has_answer_type(sentence, check.kind, facts):
                continue
            lexical = 0.0
            if asked:
                in_section = len((asked - stemmed) & source.heading_stems)
                lexical = (len(asked & stemmed) + context_weight * in_section) / len(asked)
            score = float(similarity) + lexical_weight * lexical
            if how_to and gives_instruction(sentence, facts):
                score += instruction_weight
            if best is None or score > best[0]:
                best = (score, float(similarity), index + 1, sentence)
    if best is None:
        return None
    _, similarity, n, sentence = best
    return ExtractiveAnswer(f'"{sentence}" [{n}]', n, similarity)


# A complete sentence in a stream: end punctuation, optional markers, whitespace, then the next
# sentence's first character (not "[": that may be a marker of this sentence still arriving).
_STREAM_BOUNDARY = re.compile(r"(?<=[.!?])(?:\s*\[\s*\d{1,3}(?:\s*,\s*\d{1,3})*\s*\])*\s+(?=[^\s\[])|\n+(?=\S)")


class SentenceGate:
    """Streams an answer sentence by sentence, showing only what passes ``check``.

    ``feed(text)`` takes the next piece of the model's (marker-filtered) text and returns the checked
    text that may be shown now (whole sentences, joined by spaces; ``""`` while a sentence is still
    arriving). Nothing is shown until the shown text addresses the question
    (``GroundingCheck.addresses``); sentences that passed before that are held, then released together.
    ``finish()`` checks the last sentence and returns what may still be shown; afterwards ``verdicts``
    lists every sentence's ``Verdict``, ``shown`` the shown ones, and ``reason`` why nothing was
    (``None`` when something was).
    """

    def __init__(self, check: GroundingCheck):
        self.check = check
        self.buffer = ""
        self.verdicts: list[Verdict] = []
        self.held: list[Verdict] = []
        self.shown: list[Verdict] = []
        self.addressed = False
        self.reason: str | None = None

    def _judge(self, sentence: str, *, last: bool = False) -> str:
        body = MARKER.sub(" ", sentence).strip()
        stemmed = set(stems(body))
        if last and body and not body.endswith((".", "!", "?", ")", '"')):
            verdict = Verdict(sentence, sentence, False, "unfinished (the answer was cut off)")
        elif stemmed and any(stemmed <= set(stems(v.text)) for v in self.shown + self.held):
            verdict = Verdict(sentence, sentence, False, "repeats an earlier sentence")
        else:
            verdict = self.check.check(sentence)
        self.verdicts.append(verdict)
        if not verdict.shown:
            return ""
        if self.addressed:
            self.shown.append(verdict)
            return " " + verdict.text
        self.held.append(verdict)
        ok, _ = self.check.addresses(" ".join(v.text for v in self.held))
        if not ok:
            return ""
        self.addressed = True
        self.shown.extend(self.held)
        self.held = []
        return " ".join(v.text for v in self.shown)

    def feed(self, text: str) -> str:
        """Add ``text``; returns the checked text that can be shown now."""
        self.buffer += text
        out = []
        searched = 0
        while True:
            match = _STREAM_BOUNDARY.search(self.buffer, searched)
            if not match:
                break
            if ends_with_abbreviation(self.buffer[:match.start()]) and "\n" not in match.group(0):
                searched = match.end()
                continue
            searched = 0
            sentence, self.buffer = self.buffer[:match.end()].strip(), self.buffer[match.end():]
            if sentence:
                out.append(self._judge(sentence))
        return "".join(out)

    def finish(self) -> str:
        """Check what is left in the buffer; returns the text that can still be shown."""
        sentence, self.buffer = self.buffer.strip(), ""
        out = self._judge(sentence, last=True) if sentence else ""
        if not self.addressed:
            removed = [v for v in self.verdicts if not v.shown]
            if self.held:
                _, reason = self.check.addresses(" ".join(v.text for v in self.held))
                for verdict in self.held:
                    verdict.shown, verdict.reason = False, reason
                self.held = []
                self.reason = reason
            elif removed:
                self.reason = "no sentence passed the check"
            else:
                self.reason = "the model's answer was empty"
        return out

    def confirmed_sources(self) -> set[int]:
        """Sources the model itself cited in a shown sentence and the check confirmed."""
        return {v.source for v in self.shown if v.source is not None and not v.recited}
