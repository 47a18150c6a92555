"""The evaluation gate: model versions compared on a dataset's held-out examples through the serving
path (retrieval, abstention, the grounded prompt, the quantised GGUF in llama-cpp-python, citation
checks: ``chat.services.answer_compose``), and the promotion decision.

Arms (each a model version with or without retrieval):

- ``base+retrieval``: the base GGUF without adapter, as a fresh install serves it (RAG only);
- ``candidate``: the fine-tuned candidate without retrieval (fine-tuning only: the question alone);
- ``candidate+retrieval``: the candidate served as it would be (fine-tune + RAG);
- ``active+retrieval``: the version serving now (skipped, and reported as the base arm's figures,
  when it is the base).

Metrics per arm, over the held-out questions:

- ``token_f1``: SQuAD token-F1 against the corrected answer on answerable questions (abstentions
  score 0) — the primary metric;
- ``citation_validity``: markers naming a source of the prompt over all markers the model wrote
  (``None`` when it wrote none; the gate then counts it as 0); ``cited_answers``: answerable
  questions whose answer carries a valid citation;
- ``citation_precision``: cited chunks overlapping a gold chunk (same source, overlapping span) over
  cited chunks;
- ``abstention_accuracy``: unanswerable questions (held-out corrections without supporting chunks)
  declined, either by the pipeline or by an answer saying it cannot find it (token-F1 >= 0.5 with
  the abstention message); ``false_abstention``: answerable questions declined;
- ``ttft_p50_ms``/``ttft_p95_ms`` and ``tokens_per_s_p50``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from chat import engine as engine_module
from chat.answer_metrics import token_f1
from chat.model_client import model_client
from chat.models import ModelVersion
from chat.services import ABSTAIN_MESSAGE, answer_compose, model_version_active, model_version_register
from knowledge.evaluation import percentile
from tuning.models import ModelEvaluation, TrainingDataset, TrainingExample

ARMS = ("base+retrieval", "candidate", "candidate+retrieval", "active+retrieval")
ABSTENTION_F1 = 0.5


@dataclass(frozen=True)
class HeldOutQuestion:
    """A held-out question: ``gold`` is ``[(source_id, start, end)]`` of the supporting chunks (empty
    for an unanswerable question), ``reference`` the corrected answer."""

    example_id: int
    question: str
    history: list[dict]
    collection: str
    reference: str
    gold: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def answerable(self) -> bool:
        return bool(self.gold)


def heldout_questions(dataset: TrainingDataset, *, limit: int | None = None,
                      unanswerable_share: float = 0.25) -> list[HeldOutQuestion]:
    """The held-out examples of ``dataset`` as questions, in stored order: at most ``limit`` (default
    ``TUNING_EVAL_MAX_QUESTIONS``), of which up to ``unanswerable_share`` are unanswerable (no
    supporting chunks: agents marked them missing from the knowledge base, or seeded out-of-scope
    questions) and the rest answerable. Taking the first ``limit`` examples alone left abstention
    unmeasured when the unanswerable ones were stored last (seeding adds them after the questions)."""
    limit = settings.TUNING_EVAL_MAX_QUESTIONS if limit is None else limit
    examples = list(dataset.examples.filter(split=TrainingExample.Split.HELDOUT)
                    .select_related("correction__message__conversation").order_by("id"))
    unanswerable = [e for e in examples if e.correction is not None and not e.correction.supporting_chunks]
    answerable = [e for e in examples if e not in unanswerable]
    kept_unanswerable = unanswerable[: int(limit * unanswerable_share)]
    chosen = set(map(id, kept_unanswerable + answerable[: limit - len(kept_unanswerable)]))
    questions = []
    for example in (e for e in examples if id(e) in chosen):
        correction = example.correction
        metadata = example.record.get("metadata", {})
        collection = (correction.message.conversation.collection
                      if correction is not None and correction.message_id else metadata.get("collection", "default"))
        gold = [(s["source_id"], s["start"], s["end"]) for s in (correction.supporting_chunks if correction else [])]
        questions.append(HeldOutQuestion(
            example_id=example.pk, question=metadata.get("question", ""), history=list(metadata.get("history") or []),
            collection=collection, reference=metadata.get("reference_answer", ""), gold=gold,
        ))
    return questions


def is_abstention(text: str, abstained: bool) -> bool:
    """Whether an answer declines: the pipeline abstained, or the text says what the abstention
    message says (token-F1 >= ``ABSTENTION_F1`` with ``ABSTAIN_MESSAGE``)."""
    return abstained or token_f1(text, ABSTAIN_MESSAGE) >= ABSTENTION_F1


def _on_gold(citation: dict, gold: list[tuple[int, int, int]]) -> bool:
    return any(citation["source_id"] == s and citation["start"] < e and citation["end"] > b for s, b, e in gold)


def arm_answers(version: ModelVersion, questions: list[HeldOutQuestion], *, retrieval: bool,
                engine: engine_module.Engine | None = None) -> list[dict]:
    """Answer every question with ``version`` through ``answer_compose`` on a dedicated engine
    (loaded here and shut down after, unless ``engine`` is given; with ``LLM_SERVER_URL`` set, the
    model server's client, which serves the version beside the active one), with or without ``retrieval``.
    The model always writes the answer (``quote_first=False``: a quoted source sentence would make
    every arm the same; ``curated=False``: a held-out correction's own curated answer would too); with
    retrieval its text passes the serving path's groundedness check.

    Returns one row per question: ``{"example_id", "text", "abstained", "declined", "f1",
    "markers", "cited", "cited_on_gold", "ttft_ms", "tokens_per_s", "error"}``.
    Raises ``engine_module.EngineError`` when the version cannot be loaded.
    """
    own = engine is None and not settings.LLM_SERVER_URL
    if engine is None and settings.LLM_SERVER_URL:
        engine = model_client()  # the model server loads the version beside the active one
    engine = engine or engine_module.Engine(queue_size=1)
    if isinstance(engine, engine_module.Engine):
        engine.ensure(engine_module.ModelKey(version.base_model_path, version.adapter_path))
    rows = []
    try:
        for question in questions:
            composed, error = None, ""
            for event in answer_compose(question.question, history=question.history, collection=question.collection,
                                        version=version, engine=engine, retrieval=retrieval, quote_first=False,
                                        curated=False):
                if event.type == "answer.composed":
                    composed = event.data["answer"]
                elif event.type in ("chat.error", "chat.busy"):
                    error = event.data.get("message", event.type)
            if composed is None:
                rows.append({"example_id": question.example_id, "text": "", "abstained": False, "declined": False,
                             "f1": 0.0, "markers": {"total": 0, "valid": 0}, "cited": 0, "cited_on_gold": 0,
                             "ttft_ms": None, "tokens_per_s": None, "error": error, "answerable": question.answerable})
                continue
            declined = is_abstention(composed.text, composed.abstained)
            rows.append({
                "example_id": question.example_id, "text": composed.text, "abstained": composed.abstained,
                "declined": declined, "answerable": question.answerable,
                "f1": 0.0 if declined or not question.answerable else round(token_f1(composed.text, question.reference), 4),
                "markers": composed.citation_markers, "cited": len(composed.citations),
                "cited_on_gold": sum(_on_gold(c, question.gold) for c in composed.citations),
                "ttft_ms": None if composed.abstained else composed.timings.get("ttft_ms"),
                "tokens_per_s": None if composed.abstained else composed.timings.get("tokens_per_s"),
                "error": "",
            })
    finally:
        if own:
            engine.shutdown()
    return rows


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def arm_metrics(rows: list[dict]) -> dict:
    """The metrics of one arm from its ``arm_answers`` rows (see the module docstring)."""
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    timed = [r for r in rows if r["ttft_ms"] is not None]
    markers_total = sum(r["markers"]["total"] for r in rows)
    cited = sum(r["cited"] for r in rows)
    return {
        "questions": len(rows), "answerable": len(answerable), "unanswerable": len(unanswerable),
        "errors": sum(bool(r["error"]) for r in rows),
        "token_f1": round(statistics.fmean(r["f1"] for r in answerable), 4) if answerable else None,
        "citation_validity": _ratio(sum(r["markers"]["valid"] for r in rows), markers_total),
        "markers": markers_total,
        "cited_answers": _ratio(sum(r["cited"] > 0 for r in answerable), len(answerable)),
        "citation_precision": _ratio(sum(r["cited_on_gold"] for r in rows), cited),
        "abstention_accuracy": _ratio(sum(r["declined"] for r in unanswerable), len(unanswerable)),
        "false_abstention": _ratio(sum(r["declined"] for r in answerable), len(answerable)),
        "ttft_p50_ms": round(percentile([r["ttft_ms"] for r in timed], 50), 1) if timed else None,
        "ttft_p95_ms": round(percentile([r["ttft_ms"] for r in timed], 95), 1) if timed else None,
        "tokens_per_s_p50": round(percentile([r["tokens_per_s"] for r in timed], 50), 1) if timed else None,
    }


def base_version_for(version: ModelVersion) -> ModelVersion:
    """The registered version serving ``version``'s base GGUF without an adapter (registered now
    when missing)."""
    existing = ModelVersion.objects.filter(base_model_path=version.base_model_path, adapter_path="").order_by("id").first()
    if existing is not None:
        return existing
    return model_version_register(name=f"base-{version.base_model_sha256[:12] or version.pk}",
                                  base_model_path=version.base_model_path, notes="base model without adapter")


def evaluation_run(dataset: TrainingDataset, candidate: ModelVersion, *, run=None,
                   questions: list[HeldOutQuestion] | None = None, on_progress=None) -> ModelEvaluation:
    """Evaluate the four arms (``ARMS``) on ``dataset``'s held-out questions and store a
    ``ModelEvaluation`` (``arms`` = ``{arm: {"version_id", "version", "retrieval", "duration_s",
    **arm_metrics}}``, ``rows`` per arm and question, ``report_html``). ``on_progress(done, total)``
    is called after each arm. The active version is read once at the start.

    Raises ``ValueError`` when there is no held-out question; ``engine_module.EngineError`` when a
    version cannot be loaded (the evaluation is stored as failed first).
    """
    from tuning.reports import evaluation_report_html

    questions = heldout_questions(dataset) if questions is None else questions
    if not questions:
        raise ValueError(f"dataset v{dataset.version} has no held-out examples to evaluate on")
    evaluation = ModelEvaluation.objects.create(run=run, dataset=dataset)
    base = base_version_for(candidate)
    active = model_version_active()
    plan = [("base+retrieval", base, True), ("candidate", candidate, False),
            ("candidate+retrieval", candidate, True), ("active+retrieval", active, True)]
    arms: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    try:
        for index, (name, version, retrieval) in enumerate(plan):
            same = next((other for other, v, r in plan[:index]
                         if other in arms and v.base_model_path == version.base_model_path
                         and v.adapter_path == version.adapter_path and r == retrieval), None)
            started = time.perf_counter()
            if same is not None:  # the active version is the base (or the candidate): same answers
                rows[name] = rows[same]
                arms[name] = {**arms[same], "version_id": version.pk, "version": version.name, "same_as": same}
            else:
                rows[name] = arm_answers(version, questions, retrieval=retrieval)
                arms[name] = {"version_id": version.pk, "version": version.name, "retrieval": retrieval,
                              "duration_s": round(time.perf_counter() - started, 1), **arm_metrics(rows[name])}
            if on_progress:
                on_progress(index + 1, len(plan))
    except Exception as error:
        ModelEvaluation.objects.filter(pk=evaluation.pk).update(
            status=ModelEvaluation.Status.FAILED, error=str(error), arms=arms, finished_at=timezone.now())
        raise
    evaluation.arms = arms
    evaluation.rows = [{"arm": arm, "question": q.question, "reference": q.reference, **row}
                       for arm in arms for q, row in zip(questions, rows[arm])]
    evaluation.status = ModelEvaluation.Status.SUCCEEDED
    evaluation.finished_at = timezone.now()
    evaluation.report_html = evaluation_report_html(evaluation, run=run)
    evaluation.save()
    return evaluation


@dataclass(frozen=True)
class GateTolerances:
    """The promotion gate's thresholds (absolute, on 0..1 metrics): the candidate's token-F1 must
    exceed the active model's by more than ``min_f1_gain``; citation validity and abstention
    accuracy may drop by at most ``citation_tolerance`` / ``abstention_tolerance``."""

    min_f1_gain: float = 0.0
    citation_tolerance: float = 0.05
    abstention_tolerance: float = 0.05

    @classmethod
    def from_settings(cls) -> "GateTolerances":
        return cls(settings.TUNING_GATE_MIN_F1_GAIN, settings.TUNING_GATE_CITATION_TOLERANCE,
                   settings.TUNING_GATE_ABSTENTION_TOLERANCE)


def gate_decide(arms: dict[str, dict], tolerances: GateTolerances | None = None) -> dict:
    """Whether ``candidate+retrieval`` should replace ``active+retrieval``: ``{"promote": bool,
    "reason": str, "f1_gain", "citation_validity_change", "abstention_accuracy_change"}``.

    Promote only when token-F1 beats the active model by more than ``min_f1_gain`` and neither
    citation validity (no markers counts as 0 when the active model wrote some) nor abstention
    accuracy (checked only when there are unanswerable held-out questions) drops beyond tolerance.
    """
    tolerances = tolerances or GateTolerances.from_settings()
    candidate, active = arms["candidate+retrieval"], arms["active+retrieval"]
    f1_gain = round((candidate["token_f1"] or 0.0) - (active["token_f1"] or 0.0), 4)
    validity = {k: (arms[k]["citation_validity"] if arms[k]["citation_validity"] is not None
                    else (1.0 if arms[k]["markers"] == 0 and active["markers"] == 0 else 0.0))
                for k in ("candidate+retrieval", "active+retrieval")}
    validity_change = round(validity["candidate+retrieval"] - validity["active+retrieval"], 4)
    abstention_change = None
    if candidate["abstention_accuracy"] is not None and active["abstention_accuracy"] is not None:
        abstention_change = round(candidate["abstention_accuracy"] - active["abstention_accuracy"], 4)
    decision = {"f1_gain": f1_gain, "citation_validity_change": validity_change,
                "abstention_accuracy_change": abstention_change, "tolerances": tolerances.__dict__}
    if candidate.get("errors"):
        return {**decision, "promote": False, "reason": f"the candidate failed to answer {candidate['errors']} question(s)"}
    if f1_gain <= tolerances.min_f1_gain:
        return {**decision, "promote": False,
                "reason": f"token-F1 {candidate['token_f1']} does not beat the active model's {active['token_f1']} "
                          f"(gain {f1_gain:+.4f}, needs > {tolerances.min_f1_gain:+.4f})"}
    if validity_change < -tolerances.citation_tolerance:
        return {**decision, "promote": False,
                "reason": f"citation validity drops by {-validity_change:.4f} (tolerance {tolerances.citation_tolerance})"}
    if abstention_change is not None and abstention_change < -tolerances.abstention_tolerance:
        return {**decision, "promote": False,
                "reason": f"abstention accuracy drops by {-abstention_change:.4f} (tolerance {tolerances.abstention_tolerance})"}
    note = "" if abstention_change is not None else "; no unanswerable held-out questions, abstention not checked"
    return {**decision, "promote": True,
            "reason": f"token-F1 {candidate['token_f1']} vs {active['token_f1']} ({f1_gain:+.4f}), citation validity "
                      f"{validity_change:+.4f}, abstention accuracy "
                      f"{'n/a' if abstention_change is None else f'{abstention_change:+.4f}'}{note}"}


def extractive_rows(questions: list[HeldOutQuestion]) -> list[dict]:
    """The no-model baseline every arm must beat, computed in the same run: for each question,
    retrieval as the arms see it (``knowledge.selectors.conversation_search`` with its history, curated
    answers left out, the prompt's first ``LLM_PROMPT_SOURCES`` chunks cut to ``LLM_SOURCE_MAX_CHARS``)
    and, as the answer, the
    source sentence closest to the question by the embedding model
    (``chat.answer_metrics.closest_sentence_baseline``: no threshold, so it never declines), cited to
    the chunk it came from.

    Returns rows shaped like ``arm_answers``' (``ttft_ms``/``tokens_per_s`` are ``None``: no model).
    """
    from chat.answer_metrics import closest_sentence_baseline
    from chat.grounding import GroundingCheck
    from chat.prompts import source_excerpt, without_markers
    from knowledge.selectors import conversation_search

    rows = []
    for question in questions:
        chunks = conversation_search(question.question, question.history, k=settings.RETRIEVAL_K,
                                     collection=question.collection, exclude_kinds=("curated",)
                                     ).chunks[: settings.LLM_PROMPT_SOURCES]
        check = GroundingCheck(question.question, [source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS) for c in chunks],
                               titles=[without_markers(c.source_title) for c in chunks])
        text = closest_sentence_baseline(check)
        cited = [c for c, source in zip(chunks, check.sources) if text and text in (s.strip() for s in source.sentences)][:1]
        on_gold = [c for c in cited if _on_gold({"source_id": c.source_id, "start": c.start, "end": c.end}, question.gold)]
        rows.append({
            "example_id": question.example_id, "text": text, "abstained": False, "declined": False,
            "answerable": question.answerable,
            "f1": round(token_f1(text, question.reference), 4) if question.answerable else 0.0,
            "markers": {"total": len(cited), "valid": len(cited)}, "cited": len(cited), "cited_on_gold": len(on_gold),
            "ttft_ms": None, "tokens_per_s": None, "error": "",
        })
    return rows
