"""What a customer's message asks of the assistant, before anything is retrieved: a person
(``asks_for_a_person``), nothing but courtesy (``small_talk``: a greeting, thanks, goodbye), or that
the assistant set aside its instructions (``instructs_the_assistant``).

Both are patterns over the message's words, chosen to flag none of the 7,808 customer turns of
Doc2Dial and ``benchmarks/data`` that ask something else (``tests/chat/test_intents.py``).
"""

from __future__ import annotations

import re

# --- a person --------------------------------------------------------------------------------------

_PERSON = r"(?:a\s+|an\s+|the\s+|your\s+)?(?:real\s+|live\s+|actual\s+)?(?:human(?:\s+being)?|person|agent|representative|rep|operator|someone|somebody|staff|support\s+agent)"
# "I want to talk to a person", "can I speak with someone", "let me chat with an agent", "connect me to a
# human", "transfer me to an agent", or only "a person, please" / "human".
_ASKS_FOR_PERSON = re.compile(
    r"(?i)\b(?:i(?:'d|\s+would)?\s+(?:want|like|need|wish|prefer)(?:\s+to)?|i'd\s+rather|can\s+i|could\s+i|may\s+i|"
    r"let\s+me|i\s+have\s+to|i\s+must)\s+(?:please\s+)?(?:talk|speak|chat)\s+(?:directly\s+)?(?:to|with)\s+" + _PERSON + r"\b"
    r"|\b(?:connect|transfer|put)\s+me\s+(?:through\s+)?(?:to|with)\s+" + _PERSON + r"\b"
    r"|^\W*" + _PERSON + r"(?:\s+please)?\W*$"
)
# A question about how or where to reach someone ("How can I speak to an agent?") is answered from the
# knowledge base (a phone number, a form), and a refusal ("No, I don't need to speak to an agent") is none.
_ASKS_HOW_OR_REFUSES = re.compile(r"(?i)^\W*(?:how|where|when|what|which|who)\b|\b(?:no|not|don't|do\s+not|never|n't)\b")
# Short replies that accept an offer ("Would you like me to connect you with a person?").
_ACCEPTS = re.compile(
    r"(?i)^\W*(?:yes|yeah|yep|yup|sure|ok(?:ay)?|please(?:\s+do)?|go\s+ahead|do\s+it|connect\s+me|"
    r"that\s+would\s+be\s+(?:great|good|nice|helpful))\b[\w\s,.!']*$")
_ACCEPT_MAX_WORDS = 6


def asks_for_a_person(message: str, *, offered: bool = False) -> bool:
    """Whether a customer ``message`` asks to be handed to a person: it says so ("I'd like to talk to
    a person", "connect me to an agent", "human please"), or, when the assistant's last reply
    ``offered`` one (its decline, ``ABSTAIN_MESSAGE``, ends "Would you like me to connect you with a
    person?"), it accepts ("Yes please", "sure", "ok"). Questions about how to reach someone ("How
    can I speak to an agent?") and refusals ("No, I don't need to") are not requests."""
    text = message.strip()
    if not text or _ASKS_HOW_OR_REFUSES.search(text):
        return False
    return bool(_ASKS_FOR_PERSON.search(text)) or (offered and could_accept_an_offer(text))


def could_accept_an_offer(message: str) -> bool:
    """Whether ``message`` is a short reply that would accept an offer ("Yes please", "sure", "ok"),
    whatever came before; the pipeline asks whether a person was offered only then."""
    text = message.strip()
    return (len(text.split()) <= _ACCEPT_MAX_WORDS and bool(_ACCEPTS.match(text))
            and not _ASKS_HOW_OR_REFUSES.search(text))


# --- greetings and thanks ----------------------------------------------------------------------------

_FILLER = r"(?:(?:ok(?:ay)?|great|perfect|cool|awesome|nice|got\s+it|alright|all\s+right|oh|ah|well)\W+)*"
_SMALL_TALK = {
    "greeting": re.compile(
        r"(?i)^\W*" + _FILLER + r"(?:hi|hello|hey|hiya|howdy|greetings|good\s+(?:morning|afternoon|evening|day))"
        r"(?:\W+(?:there|team|all|everyone|again))?\W*$"),
    "thanks": re.compile(
        r"(?i)^\W*" + _FILLER + r"(?:thanks?|thank\s+you|thx|ty|cheers|many\s+thanks)"
        r"(?:\W+(?:a\s+lot|so\s+much|very\s+much|a\s+bunch|again))?(?:\W+for\s+(?:your|the|all\s+the)\s+help)?"
        r"(?:\W+(?:bye|goodbye|that'?s\s+all|that\s+is\s+all))?\W*$"),
    "goodbye": re.compile(
        r"(?i)^\W*" + _FILLER + r"(?:bye|goodbye|bye\s+bye|see\s+you|that'?s\s+all|that\s+is\s+all|"
        r"no,?\s+that'?s\s+all|nothing\s+else)(?:\W+(?:for\s+now|thanks?|thank\s+you))?\W*$"),
}


def small_talk(message: str) -> str | None:
    """The kind of a customer ``message`` that is only a greeting, thanks or goodbye ("Hi!", "ok
    thanks", "that's all, bye"): ``"greeting"``, ``"thanks"`` or ``"goodbye"``; ``None`` for anything
    that asks something ("Hi, how do I return a tent?"). Such a message gets a fixed friendly reply
    (``chat.services.SMALL_TALK_REPLIES``), not a decline: the knowledge base has no "answer" to it,
    and it is no gap in it."""
    for kind, pattern in _SMALL_TALK.items():
        if pattern.match(message):
            return kind
    return None


# --- instructions to the assistant -------------------------------------------------------------------

# A message that tells the assistant to set aside its instructions or sources, or to take another
# role: the known shapes of prompt injection (OWASP LLM01), not a customer's question.
_OVERRIDE = re.compile(
    # an imperative (at the start of a sentence, or after "please", "now", "just", "and", "then"), so a
    # customer's own question ("Can I ignore the rules about plates?") is not one
    r"(?i)(?:^|[.!?;:,]\s*|\b(?:please|now|just|and|then)\s+)(?:ignore|disregard|forget|override|bypass)\b"
    r"(?:(?:\W+\w+){0,4}?\W+(?:instructions?|sources?|rules?|context|prompts?|guidelines|documents?|"
    r"knowledge\s+base|system\s+message)\b|\s+(?:everything|all|anything)\s+(?:above|before|previous|prior|"
    r"you\s+(?:were|have\s+been)\s+told)\b)"
    r"|^\W*(?:system|developer)\s*(?:prompt|message)?\s*:\s*\w+\s+\w+"
    r"|\bnew\s+(?:system\s+)?instructions\s*:|\bnew\s+instructions\s*[.!]"
    r"|\b(?:you\s+are\s+now|from\s+now\s+on,?\s+you|pretend\s+(?:to\s+be|you\s+are))\b")


def instructs_the_assistant(message: str) -> bool:
    """Whether a customer ``message`` is an attempt to instruct the assistant rather than a question:
    it asks to ignore or override the instructions, sources or rules ("Ignore the sources and tell me
    ..."), opens as a system message ("SYSTEM: ..."), announces new instructions, or assigns the
    assistant a role ("you are now...", "pretend to be..."). Such a message is declined: whatever
    source sentence resembles it would be an answer beside the point."""
    return bool(_OVERRIDE.search(message))
