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

import functools
import statistics
import time
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.utils import timezone

from chat import engine as engine_module
from chat.answer_metrics import token_f1
from chat.model_client import model_client
from chat.models import ModelVersion
from chat.services import ABSTAIN_MESSAGE, answer_compose, model_key, model_version_active, model_version_register
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
    answerable = [e for e in examples if e.correction is None or e.correction.supporting_chunks]
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
                engine: engine_module.Engine | None = None, on_answer=None) -> list[dict]:
    """Answer every question with ``version`` through ``answer_compose`` on a dedicated engine
    (loaded here with ``TUNING_THREADS`` llama.cpp threads and shut down after, unless ``engine`` is
    given; its files are checked against their recorded SHA-256; with ``LLM_SERVER_URL`` set, the
    model server's client, which serves the version beside the active one and checks its files
    itself), with or without ``retrieval``.
    The model always writes the answer (``quote_first=False``: a quoted source sentence would make
    every arm the same; ``curated=False``: a held-out correction's own curated answer would too); with
    retrieval its text passes the serving path's groundedness check.

    Returns one row per question: ``{"example_id", "text", "abstained", "declined", "f1",
    "markers", "cited", "cited_on_gold", "ttft_ms", "tokens_per_s", "error"}``.
    Raises ``engine_module.EngineError`` when the version cannot be loaded
    (``engine_module.ModelFilesMismatch`` when a file is not the one registered).
    ``on_answer(done)`` is called after each question (``done`` answered so far).
    """
    own = engine is None and not settings.LLM_SERVER_URL
    if engine is None and settings.LLM_SERVER_URL:
        engine = model_client()  # the model server loads the version beside the active one
    engine = engine or engine_module.Engine(
        queue_size=1, load_model=functools.partial(engine_module.load_llama, n_threads=settings.TUNING_THREADS))
    if isinstance(engine, engine_module.Engine):
        engine.ensure(model_key(version))
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
                if on_answer:
                    on_answer(len(rows))
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
            if on_answer:
                on_answer(len(rows))
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
    **arm_metrics}}``, ``rows`` per arm and question, the gate's ``decision`` (``gate_decide`` with
    the ``TUNING_GATE_*`` settings), ``report_html``). ``on_progress(done, total)`` is called after
    each question (``done`` in arms, fractional) and each arm, so a run's heartbeat keeps going
    through a long arm. The active version is read once at the start.

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
                answered = (lambda done, index=index: on_progress(index + done / len(questions), len(plan))) \
                    if on_progress else None
                rows[name] = arm_answers(version, questions, retrieval=retrieval, on_answer=answered)
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
    evaluation.decision = gate_decide(arms, evaluation.rows)
    evaluation.status = ModelEvaluation.Status.SUCCEEDED
    evaluation.finished_at = timezone.now()
    evaluation.report_html = evaluation_report_html(evaluation, run=run)
    evaluation.save()
    return evaluation


@dataclass(frozen=True)
class GateTolerances:
    """The promotion gate's settings (absolute differences on 0..1 metrics).

    - ``min_f1_gain``: the lower end of the confidence interval of the candidate's token-F1 gain
      over the active model must be above this;
    - ``confidence``, ``bootstrap_resamples``, ``bootstrap_seed``: that interval (two-sided, paired
      bootstrap, see ``paired_gain_interval``);
    - ``citation_tolerance``, ``citation_precision_tolerance``, ``abstention_tolerance``: how much
      citation validity, citation precision and abstention accuracy may drop;
    - ``false_abstention_tolerance``: how much the share of answerable questions declined may rise.
    """

    min_f1_gain: float = 0.0
    citation_tolerance: float = 0.05
    abstention_tolerance: float = 0.05
    citation_precision_tolerance: float = 0.05
    false_abstention_tolerance: float = 0.05
    confidence: float = 0.95
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0

    @classmethod
    def from_settings(cls) -> "GateTolerances":
        """The ``TUNING_GATE_*`` settings."""
        return cls(
            min_f1_gain=settings.TUNING_GATE_MIN_F1_GAIN,
            citation_tolerance=settings.TUNING_GATE_CITATION_TOLERANCE,
            abstention_tolerance=settings.TUNING_GATE_ABSTENTION_TOLERANCE,
            citation_precision_tolerance=settings.TUNING_GATE_CITATION_PRECISION_TOLERANCE,
            false_abstention_tolerance=settings.TUNING_GATE_FALSE_ABSTENTION_TOLERANCE,
            confidence=settings.TUNING_GATE_CONFIDENCE,
            bootstrap_resamples=settings.TUNING_GATE_BOOTSTRAP_RESAMPLES,
            bootstrap_seed=settings.TUNING_GATE_BOOTSTRAP_SEED,
        )


def paired_f1(rows: list[dict], candidate_arm: str = "candidate+retrieval",
              active_arm: str = "active+retrieval") -> tuple[list[float], list[float]]:
    """The per-question token-F1 of two arms, paired by question: ``(candidate, active)``, equal
    lengths, over the answerable questions both arms answered (``rows``: ``ModelEvaluation.rows``,
    ``{"arm", "example_id", "answerable", "f1", ...}``), in ``example_id`` order."""
    by_arm: dict[str, dict[int, float]] = {candidate_arm: {}, active_arm: {}}
    for row in rows:
        if row.get("arm") in by_arm and row.get("answerable"):
            by_arm[row["arm"]][row["example_id"]] = float(row["f1"])
    shared = sorted(by_arm[candidate_arm].keys() & by_arm[active_arm].keys())
    return [by_arm[candidate_arm][i] for i in shared], [by_arm[active_arm][i] for i in shared]


def paired_gain_interval(candidate: list[float], active: list[float], *, confidence: float = 0.95,
                         resamples: int = 10000, seed: int = 0) -> dict | None:
    """The mean per-question gain ``candidate[i] - active[i]`` and its two-sided ``confidence``
    interval by the paired bootstrap (Efron & Tibshirani, 1993; the usual significance test for NLP
    system comparisons: Koehn, 2004, "Statistical Significance Tests for Machine Translation
    Evaluation"; Berg-Kirkpatrick et al., 2012): the questions are resampled with replacement
    ``resamples`` times (``scipy.stats.bootstrap``, percentile method, a NumPy generator seeded with
    ``seed``, so the same scores give the same interval).

    Returns ``{"mean", "low", "high", "questions", "confidence", "resamples", "seed", "method"}``
    (gains rounded to 4 places), or ``None`` for fewer than 2 questions. Raises ``ValueError`` when
    the lists differ in length.
    """
    import numpy as np
    from scipy.stats import bootstrap

    if len(candidate) != len(active):
        raise ValueError(f"paired scores differ in length: {len(candidate)} vs {len(active)}")
    if len(candidate) < 2:
        return None
    gains = np.asarray(candidate, dtype=float) - np.asarray(active, dtype=float)
    if np.all(gains == gains[0]):  # every resample has the same mean
        low = high = float(gains[0])
    else:
        result = bootstrap((gains,), np.mean, n_resamples=resamples, confidence_level=confidence,
                           method="percentile", batch=1000, rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {"mean": round(float(gains.mean()), 4), "low": round(low, 4), "high": round(high, 4),
            "questions": len(gains), "confidence": confidence, "resamples": resamples, "seed": seed,
            "method": "paired bootstrap, percentile"}


def _change(candidate: float | None, active: float | None, *, missing_candidate: float | None = 0.0) -> float | None:
    """``candidate - active`` (4 places); ``None`` when ``active`` is ``None``; a missing candidate
    value counts as ``missing_candidate`` (``None``: not comparable)."""
    if active is None:
        return None
    if candidate is None:
        if missing_candidate is None:
            return None
        candidate = missing_candidate
    return round(candidate - active, 4)


def gate_decide(arms: dict[str, dict], rows: list[dict], tolerances: GateTolerances | None = None) -> dict:
    """Whether ``candidate+retrieval`` should replace ``active+retrieval``, from the arms' metrics
    (``arm_metrics``) and the per-question rows (``ModelEvaluation.rows``).

    Promote only when, in this order: the candidate answered every question; the lower end of the
    ``confidence`` interval of its per-question token-F1 gain over the active model (paired over the
    answerable questions, ``paired_gain_interval``) is above ``min_f1_gain``, so a gain within the
    noise of a few dozen questions is not promoted; citation validity (no markers counts as 0 when
    the active model wrote some) and citation precision (no citations counts as 0 when the active
    model cited) drop by at most their tolerances; abstention accuracy on unanswerable questions (when
    there are any) drops, and the share of answerable questions declined rises, by at most theirs.

    Returns ``{"promote": bool, "reason": str, "f1_gain" (mean, or None), "f1_gain_interval" (the
    interval dict, or None), "citation_validity_change", "citation_precision_change",
    "abstention_accuracy_change", "false_abstention_change" (None when not measurable),
    "tolerances": dict}``.
    """
    tolerances = tolerances or GateTolerances.from_settings()
    candidate, active = arms["candidate+retrieval"], arms["active+retrieval"]
    interval = paired_gain_interval(*paired_f1(rows), confidence=tolerances.confidence,
                                    resamples=tolerances.bootstrap_resamples, seed=tolerances.bootstrap_seed)
    validity = {k: (arms[k]["citation_validity"] if arms[k]["citation_validity"] is not None
                    else (1.0 if arms[k]["markers"] == 0 and active["markers"] == 0 else 0.0))
                for k in ("candidate+retrieval", "active+retrieval")}
    validity_change = round(validity["candidate+retrieval"] - validity["active+retrieval"], 4)
    precision_change = _change(candidate.get("citation_precision"), active.get("citation_precision"))
    abstention_change = _change(candidate["abstention_accuracy"], active["abstention_accuracy"], missing_candidate=None)
    false_abstention_change = _change(candidate.get("false_abstention"), active.get("false_abstention"),
                                      missing_candidate=None)
    decision = {"f1_gain": interval["mean"] if interval else None, "f1_gain_interval": interval,
                "citation_validity_change": validity_change, "citation_precision_change": precision_change,
                "abstention_accuracy_change": abstention_change, "false_abstention_change": false_abstention_change,
                "tolerances": asdict(tolerances)}

    def keep(reason: str) -> dict:
        return {**decision, "promote": False, "reason": reason}

    if candidate.get("errors"):
        return keep(f"the candidate failed to answer {candidate['errors']} question(s)")
    if interval is None:
        return keep("fewer than 2 answerable held-out questions: the token-F1 gain cannot be tested")
    level = f"{tolerances.confidence:.0%}"
    span = f"{level} interval [{interval['low']:+.4f}, {interval['high']:+.4f}]"
    if interval["low"] <= tolerances.min_f1_gain:
        return keep(f"token-F1 {candidate['token_f1']} vs the active model's {active['token_f1']}: gain "
                    f"{interval['mean']:+.4f}, {span} over {interval['questions']} questions; its lower end is "
                    f"not above {tolerances.min_f1_gain:+.4f}, so the gain may be noise")
    if validity_change < -tolerances.citation_tolerance:
        return keep(f"citation validity drops by {-validity_change:.4f} (tolerance {tolerances.citation_tolerance})")
    if precision_change is not None and precision_change < -tolerances.citation_precision_tolerance:
        return keep(f"citation precision drops by {-precision_change:.4f} "
                    f"(tolerance {tolerances.citation_precision_tolerance})")
    if abstention_change is not None and abstention_change < -tolerances.abstention_tolerance:
        return keep(f"abstention accuracy drops by {-abstention_change:.4f} (tolerance {tolerances.abstention_tolerance})")
    if false_abstention_change is not None and false_abstention_change > tolerances.false_abstention_tolerance:
        return keep(f"answerable questions declined rise by {false_abstention_change:.4f} "
                    f"(tolerance {tolerances.false_abstention_tolerance})")
    note = "" if abstention_change is not None else "; no unanswerable held-out questions, abstention not checked"

    def signed(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.4f}"

    return {**decision, "promote": True,
            "reason": f"token-F1 {candidate['token_f1']} vs {active['token_f1']}: gain {interval['mean']:+.4f}, {span} "
                      f"over {interval['questions']} questions; citation validity {signed(validity_change)}, "
                      f"precision {signed(precision_change)}, abstention accuracy {signed(abstention_change)}, "
                      f"answerable declined {signed(false_abstention_change)}{note}"}


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
