"""The promotion gate: candidate + retrieval must beat the active model on token-F1 without
dropping citation validity or abstention accuracy beyond tolerance."""

from __future__ import annotations

from tuning.evaluation import GateTolerances, arm_metrics, gate_decide, is_abstention
from chat.services import ABSTAIN_MESSAGE


def arm(f1, validity=0.9, abstention=1.0, markers=10, errors=0):
    return {"token_f1": f1, "citation_validity": validity, "abstention_accuracy": abstention, "markers": markers,
            "errors": errors}


def arms(candidate, active):
    return {"base+retrieval": active, "candidate": candidate, "candidate+retrieval": candidate, "active+retrieval": active}


TOL = GateTolerances(min_f1_gain=0.0, citation_tolerance=0.05, abstention_tolerance=0.05)


def test_better_f1_within_tolerances_promotes():
    decision = gate_decide(arms(arm(0.30, validity=0.87, abstention=0.96), arm(0.20)), TOL)
    assert decision["promote"] is True
    assert (decision["f1_gain"], decision["citation_validity_change"], decision["abstention_accuracy_change"]) == (0.1, -0.03, -0.04)


def test_no_f1_gain_keeps_the_active_model():
    decision = gate_decide(arms(arm(0.20), arm(0.20)), TOL)
    assert decision["promote"] is False and "does not beat" in decision["reason"]


def test_citation_validity_regression_blocks_promotion():
    decision = gate_decide(arms(arm(0.40, validity=0.80), arm(0.20, validity=0.90)), TOL)
    assert decision["promote"] is False and decision["reason"] == "citation validity drops by 0.1000 (tolerance 0.05)"


def test_a_candidate_that_stops_citing_counts_as_zero_validity():
    decision = gate_decide(arms(arm(0.40, validity=None, markers=0), arm(0.20, validity=0.9)), TOL)
    assert decision["promote"] is False and decision["citation_validity_change"] == -0.9


def test_abstention_regression_blocks_promotion_and_missing_unanswerables_are_noted():
    blocked = gate_decide(arms(arm(0.40, abstention=0.5), arm(0.20, abstention=1.0)), TOL)
    assert blocked["promote"] is False and blocked["reason"] == "abstention accuracy drops by 0.5000 (tolerance 0.05)"
    unchecked = gate_decide(arms(arm(0.40, abstention=None), arm(0.20, abstention=None)), TOL)
    assert unchecked["promote"] is True and "abstention not checked" in unchecked["reason"]


def test_candidate_errors_block_promotion():
    decision = gate_decide(arms(arm(0.9, errors=2), arm(0.2)), TOL)
    assert decision["promote"] is False and decision["reason"] == "the candidate failed to answer 2 question(s)"


def test_arm_metrics_from_rows():
    rows = [
        {"answerable": True, "f1": 0.5, "declined": False, "markers": {"total": 2, "valid": 2}, "cited": 1,
         "cited_on_gold": 1, "ttft_ms": 100.0, "tokens_per_s": 50.0, "error": ""},
        {"answerable": True, "f1": 0.0, "declined": True, "markers": {"total": 1, "valid": 0}, "cited": 0,
         "cited_on_gold": 0, "ttft_ms": 300.0, "tokens_per_s": 40.0, "error": ""},
        {"answerable": False, "f1": 0.0, "declined": True, "markers": {"total": 0, "valid": 0}, "cited": 0,
         "cited_on_gold": 0, "ttft_ms": None, "tokens_per_s": None, "error": ""},
    ]
    metrics = arm_metrics(rows)
    assert metrics["token_f1"] == 0.25 and metrics["citation_validity"] == 0.6667
    assert metrics["citation_precision"] == 1.0 and metrics["cited_answers"] == 0.5
    assert metrics["abstention_accuracy"] == 1.0 and metrics["false_abstention"] == 0.5
    assert (metrics["answerable"], metrics["unanswerable"], metrics["markers"]) == (2, 1, 3)
    assert metrics["ttft_p50_ms"] == 200.0


def test_is_abstention():
    assert is_abstention(ABSTAIN_MESSAGE, False)
    assert is_abstention("I couldn't find this in our help articles, would you like a person?", False)
    assert not is_abstention("Refunds take five business days [1].", False)
    assert is_abstention("anything", True)

