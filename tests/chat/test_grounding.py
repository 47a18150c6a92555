"""The groundedness check (``chat.grounding``): hard facts, sentence support, what the question asks
for, the streaming gate and the extractive fallback. The real sentence-embedding model measures
similarity; no database or language model is needed."""

from __future__ import annotations

import pytest

import numpy as np

from chat.grounding import (
    GroundingCheck,
    SentenceGate,
    Thresholds,
    answer_type,
    asks_how_to,
    extractive_answer,
    gives_instruction,
    hard_facts,
    has_answer_type,
    split_sentences,
)

RETURNS = ("You can return unused items in their original packaging within 60 days of delivery for a full "
           "refund. Trail Points members have 90 days. Returns by mail are free for exchanges; for refunds we "
           "deduct 5.95 dollars for the label.")
SHIPPING = ("Standard shipping is free on orders of 75 dollars or more. Below that, standard shipping costs 6.95 "
            "dollars. We ship to Canada, the United Kingdom and the European Union.")
WARRANTY = "Email warranty@tidewater.example with your order number and photos of the defect."
THRESHOLDS = Thresholds(min_coverage=0.6, min_similarity=0.5, min_relevance=0.3, min_words=2)


@pytest.fixture
def check(embedding_model):
    def make(question: str, sources=(RETURNS, SHIPPING, WARRANTY), titles=("Returns", "Shipping", "Warranty")):
        return GroundingCheck(question, list(sources), titles=list(titles), thresholds=THRESHOLDS,
                              encode=embedding_model.encode)
    return make


def test_hard_facts_are_normalised_so_the_same_fact_matches_however_it_is_written():
    facts = hard_facts("Call (800) 772-1213 or see https://www.SSA.gov/forms/. It costs $5.95, takes three business "
                       "days and weighs 1,600 g; e-mail help@ssa.gov about SKU TW-TENT-2P by June 5.")
    assert facts.urls == {"ssa.gov/forms"}
    assert facts.emails == {"help@ssa.gov"}
    assert facts.phones == {"8007721213"}
    assert facts.codes == {"TW-TENT-2P"}
    assert facts.months == {"june"}
    assert facts.numbers == {"5.95", "3", "1600", "5"}
    assert facts.quantities == {("5.95", "dollar"), ("3", "day"), ("1600", "g")}
    assert hard_facts("5.95 dollars").quantities == hard_facts("$5.95").quantities
    # "may" the verb is not a month; citation markers are not numbers
    assert hard_facts("You may return it [2].").months == frozenset()
    assert hard_facts("You may return it [2].").numbers == frozenset()


@pytest.mark.parametrize("sentence, reason", [
    ("The answer is: 6 months.", "not in the sources: number 6"),
    ("You have 60 months to return unused items [1].", "not in the sources: quantity 60 month"),
    ("See www.amazon.com/returns for the return window.", "not in the sources: link amazon.com/returns"),
    ("Write to returns@tidewater.example about your refund [1].", "not in the sources: e-mail returns@tidewater.example"),
    ("Call 555-201-0199 to start a return.", "not in the sources: phone 5552010199"),
])
def test_a_sentence_with_a_fact_the_sources_lack_is_removed(check, sentence, reason):
    verdict = check("How long do I have to return a tent?").check(sentence)
    assert (verdict.shown, verdict.reason) == (False, reason)


def test_a_supported_sentence_is_shown_with_the_marker_the_model_wrote(check):
    verdict = check("How long do I have to return a tent?").check(
        "You can return unused items within 60 days of delivery [1].")
    assert (verdict.shown, verdict.source, verdict.recited) == (True, 1, False)
    assert verdict.text == "You can return unused items within 60 days of delivery [1]."
    assert verdict.coverage == 1.0 and verdict.similarity > 0.8


def test_a_sentence_cited_to_the_wrong_source_or_to_none_is_cited_to_the_source_that_supports_it(check):
    c = check("Do you ship to Canada?")
    wrong = c.check("We ship to Canada, the United Kingdom and the European Union [1].")
    assert (wrong.shown, wrong.source, wrong.recited) == (True, 2, True)
    assert wrong.text == "We ship to Canada, the United Kingdom and the European Union [2]."
    uncited = c.check("We ship to Canada and the United Kingdom.")
    assert (uncited.shown, uncited.text) == (True, "We ship to Canada and the United Kingdom [2].")


def test_a_question_in_a_source_lends_no_words_to_a_claim(embedding_model):
    # given a source whose question heading holds most of the words of a claim it never makes
    retirement = ("What's the best time to start your retirement benefits? We're not recommending that you start "
                  "at age 62, your full retirement age, age 70, or any age in between.")
    checker = GroundingCheck("When should I start my retirement benefits?", [retirement], titles=["Retirement"],
                             thresholds=Thresholds(min_coverage=0.8, min_similarity=0.6, min_relevance=0.3, min_words=2),
                             encode=embedding_model.encode)
    # then the claim built from the question's words is removed (held-out Doc2Dial, before: shown)
    claim = checker.check("The best time to start your retirement benefits is 62, not 70 [1].")
    assert claim.shown is False and claim.reason.startswith("not supported by the sources")
    assert claim.coverage < 0.8
    # while what the source asserts is still supported
    assert checker.check("We're not recommending that you start at age 62 or age 70 [1].").shown is True


@pytest.mark.parametrize("sentence, reason_start", [
    ("Paris is the capital of France [1].", "not supported by the sources"),
    ("Our tents are the best on the market and everyone loves them.", "not supported by the sources"),
    ("How long do I have to return a tent?", "a question, not an answer"),
    ("You have to return a tent.", "restates the question"),
    ("[1]", "too short to check"),
    ("Yes.", "too short to check"),
])
def test_unsupported_off_topic_and_empty_sentences_are_removed(check, sentence, reason_start):
    verdict = check("How long do I have to return a tent?").check(sentence)
    assert verdict.shown is False
    assert verdict.reason.startswith(reason_start)


@pytest.mark.parametrize("question, kind", [
    ("How much do you deduct for a return label?", "amount"),
    ("How long do I have to return a tent?", "duration"),
    ("How many points do I need for a reward?", "count"),
    ("When are the stores open on Sunday?", "time"),
    ("What is the e-mail address for warranty claims?", "contact"),
    ("Do you ship to Canada?", None),
    ("How much does the Driftwood 2 tent weigh?", "weight"),
    ("How big is the Driftwood 2 tent when packed?", "size"),
    ("What is the weight capacity of the kayak?", "weight"),
    ("How many people fit in the Driftwood 2?", "capacity"),
    ("How warm is the Ember sleeping bag?", "rating"),
    # a "what" question that names a sum asks for its value
    ("What is the annual deductible for Medicare Part B?", "amount"),
    ("What's the maximum Pell Grant I could get for this school year?", "amount"),
    ("What percentage of my income is my payment on the Income-Sensitive Repayment Plan?", "amount"),
    ("What is the monthly Montgomery GI Bill payment for a full-time student?", "amount"),
    ("How often can I take a point reduction course?", "frequency"),
    ("What credit score do I need for a VA-backed home loan?", "count"),
    # ...but a yes/no or an explanation that mentions one does not
    ("Can I get a waiver so I don't have to pay the premiums?", None),
    ("What happens if I miss a payment?", None),
    ("What are the annual reporting requirements?", None),
])
def test_answer_type_names_what_the_question_asks_for(question, kind):
    assert answer_type(question) == kind


def test_has_answer_type_requires_what_was_asked_for():
    assert has_answer_type("We deduct 5.95 dollars.", "amount")
    assert has_answer_type("Exchanges by mail are free.", "amount")
    assert not has_answer_type("You can return unused items in their packaging.", "amount")
    assert has_answer_type("You can take the course once every 18 months.", "frequency")
    assert not has_answer_type("You must take a course approved by the DMV.", "frequency")
    assert not has_answer_type("Fill in form 1040 for your refund.", "amount")
    assert has_answer_type("Within 60 days of delivery.", "duration")
    assert not has_answer_type("Within 60 dollars.", "duration")
    assert not has_answer_type("Email us with your order number.", "contact")
    assert has_answer_type("Email warranty@tidewater.example.", "contact")


def test_a_measure_is_answered_only_by_its_own_units():
    # "two-person" is a capacity, not a weight: the tent's description does not say what it weighs
    description = "A two-person, three-season freestanding tent with two doors and two vestibules."
    assert not has_answer_type(description, "weight")
    assert has_answer_type(description, "capacity")
    assert has_answer_type(description, "rating")
    assert has_answer_type("Packed weight 1.6 kg.", "weight")
    assert not has_answer_type("Packed weight 1.6 kg.", "size")
    assert has_answer_type("Floor area 2.7 m², length 183 cm.", "size")
    assert has_answer_type("Comfortable down to 0 °C.", "rating")
    assert not has_answer_type("Comfortable on cold nights.", "rating")
    assert has_answer_type("Waterproofing: 20,000 mm.", "rating")


def test_a_supported_answer_beside_the_question_is_not_addressing_it(check):
    c = check("How much do you deduct for a return label?")
    # supported, but it gives a duration where an amount was asked for (a bare number is no amount either)
    assert c.addresses("Trail Points members get form 90 [1].")[0] is False
    assert c.addresses("Trail Points members have 90 days [1].") == (False, "does not give what the question asks for (amount)")
    assert c.addresses("For refunds we deduct 5.95 dollars for the label [1].") == (True, None)


def test_the_gate_streams_whole_checked_sentences_and_drops_the_invented_ones(check):
    gate = SentenceGate(check("How long do I have to return a tent?"))
    pieces = ["You", " can", " return", " unused", " items", " within", " 60", " days", ".", " [", "1", "]",
              " Visit", " www.tents", "-deals.com", " for", " more", ".", " Trail", " Points", " members",
              " have", " 90", " days", "."]
    shown = [gate.feed(piece) for piece in pieces]
    shown.append(gate.finish())
    # nothing is shown before a sentence is complete (including its marker), then whole sentences
    assert shown[:12] == [""] * 12
    assert "".join(shown) == "You can return unused items within 60 days. [1] Trail Points members have 90 days [1]."
    assert [(v.shown, v.reason) for v in gate.verdicts] == [
        (True, None), (False, "not in the sources: link tents-deals.com"), (True, None)]
    assert gate.reason is None


def test_the_gate_holds_supported_sentences_until_the_answer_addresses_the_question(check):
    gate = SentenceGate(check("How much do you deduct for a return label?"))
    assert gate.feed("Trail Points members have 90 days [1]. ") == ""
    assert gate.feed("For refunds we deduct 5.95 dollars for the label [1].") == ""
    assert gate.finish() == "Trail Points members have 90 days [1]. For refunds we deduct 5.95 dollars for the label [1]."


def test_the_gate_shows_nothing_when_the_supported_text_never_addresses_the_question(check):
    gate = SentenceGate(check("How much do you deduct for a return label?"))
    assert gate.feed("Trail Points members have 90 days [1].") + gate.finish() == ""
    assert gate.reason == "does not give what the question asks for (amount)"
    assert [v.shown for v in gate.verdicts] == [False]
    assert gate.verdicts[0].reason == gate.reason


def test_the_extractive_answer_quotes_the_source_sentence_that_answers_and_cites_it(check):
    quote = extractive_answer(check("How much do you deduct for a return label?"))
    assert quote.text == '"Returns by mail are free for exchanges; for refunds we deduct 5.95 dollars for the label." [1]'
    assert quote.source == 1


def test_the_extractive_answer_declines_when_no_source_sentence_is_close_enough(check):
    assert extractive_answer(check("What is the capital of France?")) is None
    # a near miss: the sources talk about shipping to Canada but give no price for it, and the
    # amount-bearing sentences are about other things
    assert extractive_answer(check("How much is shipping to Canada?"), min_relevance=0.75) is None


def test_split_sentences_keeps_markers_with_their_sentence_and_numbers_whole():
    assert split_sentences("It costs 5.95 dollars. [1] Exchanges are free [2]. Ask us!") == [
        "It costs 5.95 dollars. [1]", "Exchanges are free [2].", "Ask us!"]


@pytest.mark.parametrize("sentence", [
    "[1] Returns: You can return unused items within 60 days of delivery.",
    "2) Shipping: Standard shipping is free on orders of 75 dollars or more.",
    "Ships to Canada: [2] Shipping: We ship to Canada, the United Kingdom and the European Union.",
])
def test_a_sentence_copying_the_prompts_source_list_is_removed(check, sentence):
    verdict = check("Do you ship to Canada?").check(sentence)
    assert (verdict.shown, verdict.reason) == (False, "copies the list of sources, not an answer")


def test_the_check_embeds_with_the_settings_model_whatever_retrieval_version_is_active(monkeypatch):
    # given a promoted retrieval embedder (another encoder than the settings' one)
    import numpy as np

    from knowledge import embedding

    def unit(texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2.0

    class Encoder:
        def __init__(self):
            self.calls = 0

        def encode(self, texts, batch_size=None):
            self.calls += 1
            return unit(texts)

    settings_model, promoted = Encoder(), Encoder()
    monkeypatch.setattr(embedding, "settings_encoder", lambda: settings_model)
    monkeypatch.setattr(embedding, "get_embedding_model", lambda: promoted)
    # when a check is built without an explicit encoder
    GroundingCheck("How long is the return window?", ["Returns are accepted within 60 days."])
    # then the sentences are embedded by the model its thresholds were chosen on
    assert (settings_model.calls, promoted.calls) == (1, 0)


# The demo store's warranty claim section and the shipping policy's lost-parcel section, as retrieved
# for "How do I make a warranty claim?" (issue 9): both name a claim.
CLAIM = ("Email warranty@tidewater.example with your order number and photos of the defect. We repair the item "
         "free of charge, or replace it when a repair is not possible. Claims are answered within three business days.")
PARCELS = ("If a parcel arrives damaged or does not arrive within 10 business days of shipping, contact support. We "
           "send a replacement or refund the order; you do not need to file a claim with the carrier.")


def same_vector(texts):
    """An encoder under which every text is equally close to the question: only the lexical share,
    the section headings and the instruction bonus rank the quotes."""
    vectors = np.zeros((len(texts), 4), dtype=np.float32)
    vectors[:, 0] = 1.0
    return vectors


@pytest.mark.parametrize("question, how_to", [
    ("How do I make a warranty claim?", True),
    ("how can I apply for a replacement card", True),
    ("Where do I send photos of a defect?", True),
    ("How long do I have to return a tent?", False),  # a duration, not a procedure
    ("How much does shipping cost?", False),
    ("Do you ship to Canada?", False),
])
def test_asks_how_to_recognises_questions_about_a_procedure(question, how_to):
    assert asks_how_to(question) is how_to


@pytest.mark.parametrize("sentence, instruction", [
    ("Email warranty@tidewater.example with your order number and photos of the defect.", True),
    ("Start a return from the Orders page of your account and print the prepaid label.", True),
    ("You can also return items at no cost at any Tidewater store.", True),
    ("To renew your licence, fill in the form at the office.", True),
    ("- Call the office before noon.", True),
    ("We repair the item free of charge, or replace it when a repair is not possible.", False),
    ("Claims are answered within three business days.", False),
    ("Return labels cost 5.95 dollars.", False),  # "Return" is the subject here, not an imperative
])
def test_gives_instruction_recognises_a_sentence_that_tells_the_reader_what_to_do(sentence, instruction):
    assert gives_instruction(sentence) is instruction


def test_a_how_to_question_quotes_the_instruction_not_a_statement_beside_it(embedding_model):
    # given the demo's warranty claim section and the lost-parcel section, with their headings
    check = GroundingCheck("How do I make a warranty claim?", [CLAIM, PARCELS],
                           titles=["Tidewater Lifetime Warranty", "Shipping policy"],
                           headings=["Tidewater Lifetime Warranty > How to make a claim",
                                     "Shipping policy > Lost or damaged parcels"],
                           thresholds=THRESHOLDS, encode=embedding_model.encode)
    # when the quote is chosen (no sentence is within 0.6, so this is the fallback at 0.4)
    assert extractive_answer(check, min_relevance=0.6) is None
    quote = extractive_answer(check, min_relevance=0.4)  # EXTRACTIVE_CONTEXT_WEIGHT, EXTRACTIVE_INSTRUCTION_WEIGHT
    # then it is the e-mail instruction of the claim section, not the carrier sentence that also says "claim"
    assert quote.text == '"Email warranty@tidewater.example with your order number and photos of the defect." [1]'
    # (ranked by similarity and the question's words in the sentence alone, the carrier sentence won)
    old = extractive_answer(check, min_relevance=0.4, context_weight=0.0, instruction_weight=0.0)
    assert old.text == '"We send a replacement or refund the order; you do not need to file a claim with the carrier." [2]'


def test_a_question_word_in_the_section_heading_counts_for_the_sentences_below_it():
    # given two sections whose sentences are equally close to the question and hold the same words
    check = GroundingCheck("How long does a refund take?", ["It takes 3 to 5 business days.", "It takes 5 business days."],
                           headings=["Shipping > Delivery times", "Returns > Refund timing"],
                           thresholds=THRESHOLDS, encode=same_vector)
    # then the one under the heading naming the refund is quoted, and only because of its heading
    assert extractive_answer(check, context_weight=1.0, instruction_weight=0.0).text == '"It takes 5 business days." [2]'
    assert extractive_answer(check, context_weight=0.0, instruction_weight=0.0).text == '"It takes 3 to 5 business days." [1]'


def test_an_instruction_gains_only_for_a_question_asking_how_to():
    sources = ["Claims are answered within three business days.", "Email warranty@tidewater.example with photos."]
    how_to = GroundingCheck("How do I make a warranty claim?", sources, thresholds=THRESHOLDS, encode=same_vector)
    assert extractive_answer(how_to, context_weight=0.0, instruction_weight=0.1).source == 2
    assert extractive_answer(how_to, context_weight=0.0, instruction_weight=0.0).source == 1
    statement = GroundingCheck("Is a warranty claim answered quickly?", sources, thresholds=THRESHOLDS, encode=same_vector)
    assert extractive_answer(statement, context_weight=0.0, instruction_weight=0.1).source == 1

