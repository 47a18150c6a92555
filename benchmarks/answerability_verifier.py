"""Feasibility experiment: train a small answerability verifier and measure whether it declines
near-miss questions (on topic, answer not in the knowledge base) while still answering answerable ones.

The verifier is a cross-encoder (sentence-transformers ``CrossEncoder``, one logit) initialised from
the packaged all-MiniLM-L6-v2 BERT weights (the embedder's folder; the classification head is new).
It scores ``(question with the conversation's earlier user turns, one candidate source sentence)``:
does this sentence answer the question? The field's reference is a small evaluator model run on
every answer (Galileo's Luna); the pairs follow the usual answer-sentence selection set-up
(positives: the gold span's sentences; negatives: other sentences of the retrieved chunks and of the
gold page, the "neighbouring fact" a near-miss question gets answered with).

Data (Doc2Dial, ``knowledge.evaluation.GoldQuestion.split``):
- training pairs come only from the ``tune`` half of the dialogues, and only from the dialogues
  outside its calibration fifth (``calibration_split``: SHA-256 of ``"calibration:" + dialogue``);
- the threshold is chosen on the calibration fifth (answerable, all turns; unseen by training) and the
  tune half of the near-miss questions (even rows, as ``benchmarks/grounding_thresholds.py``);
- everything is reported on the ``heldout`` half (first turns and follow-ups separately) and the odd
  near-miss rows; near-miss questions are never trained on.

A question is answered when retrieval passes the distance threshold (``ABSTAIN_MAX_DISTANCE``, as
the pipeline) and the best verifier score reaches the threshold; the verifier scores the ``--rerank``
sentences closest to the question by the embedder among the sentences of the top ``--k`` retrieved
chunks (a CPU budget: ~25-40 ms per pair on one shared thread). Training also fits one shared thread:
the embeddings and the lowest ``--freeze-layers`` layers keep the embedder's weights. Baselines computed in the same run on the same questions: the distance
threshold alone; the current check without the model (``extractive_answer`` at
``EXTRACTIVE_MIN_RELEVANCE`` over the pipeline's quote candidates: it answers whenever a quote
qualifies, and the generated path can only add answers, so its near-miss "declined" is an upper
bound of the pipeline's); and the embedder's own best cosine similarity swept like the verifier.

    EMBEDDED_SERVICES=1 DATABASE_NAME=verifier python benchmarks/answerability_verifier.py \\
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial \\
        --seed 13 --output /tmp/answerability-verifier --cache /tmp/answerability_retrieval.json

Step 1 (retrieval, cached in ``--cache``) needs the database; step 2 trains (``--epochs``, CPU, one
thread) and step 3 scores and prints the tables; ``--model FOLDER`` skips step 2 and scores a saved
verifier. Measured result: README, "Groundedness check", "A trained answerability verifier".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- pure helpers (tests/benchmarks/test_answerability_verifier.py) ---------------------------------


def locate_sentences(text: str, sentences: Sequence[str], *, base: int = 0) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``sentences`` (in order, as ``chat.grounding.source_sentences``
    cuts them: whitespace may differ, pieces may be joined across lines) in ``text``, shifted by
    ``base``; a sentence not found gets ``(-1, -1)`` and the search goes on from where it was."""
    spans, position = [], 0
    for sentence in sentences:
        words = sentence.split()
        if not words:
            spans.append((-1, -1))
            continue
        match = re.compile(r"\s+".join(re.escape(word) for word in words)).search(text, position)
        if match is None:
            spans.append((-1, -1))
            continue
        spans.append((base + match.start(), base + match.end()))
        position = match.end()
    return spans


def span_label(start: int, end: int, answer_start: int, answer_end: int, *, min_share: float = 0.5) -> int | None:
    """Whether the sentence ``[start, end)`` is an answer sentence for the gold span
    ``[answer_start, answer_end)``: ``1`` when their overlap covers at least ``min_share`` of the
    shorter of the two (a sentence inside the span, or a sentence holding a short span), ``0`` when
    they do not overlap (or the sentence was not located, ``start < 0``), ``None`` (ambiguous: left out
    of training) for a smaller overlap."""
    if start < 0:
        return 0
    overlap = min(end, answer_end) - max(start, answer_start)
    if overlap <= 0:
        return 0
    return 1 if overlap >= min_share * min(end - start, answer_end - answer_start) else None


_WORD = re.compile(r"[^\W_]+")
_STOP = frozenset("a an and are as at be by can do does for from how i if in is it my of on or the to what when "
                  "where which who will with you your".split())


def shared_words(query: str, sentence: str) -> int:
    """How many distinct content words (lower case, stop words left out) ``sentence`` shares with ``query``."""
    words = {w for w in _WORD.findall(query.lower()) if w not in _STOP}
    return len(words & set(_WORD.findall(sentence.lower())))


def question_pairs(query: str, candidates: Sequence[dict], page: Sequence[dict], *, gold_file: str,
                   answer_start: int, answer_end: int, max_retrieved: int, max_page: int,
                   rng: random.Random) -> list[tuple[str, str, int]]:
    """Training pairs ``(query, sentence, label)`` for one question.

    ``candidates``: sentences of the retrieved chunks, best chunk first, as ``{"file", "start", "end",
    "text"}`` (offsets into ``file``'s text); ``page``: the gold page's sentences in the same shape.
    Positives: every sentence labelled 1 by ``span_label`` (the page's, so a question whose gold
    passage retrieval missed still teaches the answer). Negatives: up to ``max_retrieved`` sentences
    of the retrieved chunks labelled 0, hard ones first (the most content words shared with
    ``query``, ties broken by ``rng``: the sentences a near-miss question is answered with share its
    words), and up to ``max_page`` of the page's own sentences outside the span, nearest to it first
    (the neighbouring facts). Ambiguous sentences (label ``None``) and duplicates are left out; no
    positive, no pairs."""
    def label(s):
        return span_label(s["start"], s["end"], answer_start, answer_end) if s["file"] == gold_file else 0

    pairs, seen = [], set()

    def add(text: str, value: int) -> None:
        key = " ".join(text.split())
        if key and key not in seen:
            seen.add(key)
            pairs.append((query, key, value))

    for s in page:
        if label(s) == 1:
            add(s["text"], 1)
    if not pairs:
        return []
    retrieved = [s for s in candidates if label(s) == 0]
    rng.shuffle(retrieved)
    retrieved.sort(key=lambda s: -shared_words(query, s["text"]))
    for s in retrieved[:max_retrieved]:
        add(s["text"], 0)
    outside = sorted((s for s in page if label(s) == 0),
                     key=lambda s: min(abs(s["start"] - answer_end), abs(answer_start - s["end"])))
    for s in outside[:max_page]:
        add(s["text"], 0)
    return pairs


def decisions_curve(answerable: Sequence[float], near_miss: Sequence[float], thresholds: Sequence[float]) -> list[dict]:
    """For each threshold, the share of ``answerable`` scores at or above it (answered) and of
    ``near_miss`` scores below it (declined); a question declined before scoring has score ``-inf``."""
    rows = []
    for t in thresholds:
        rows.append({"threshold": t,
                     "answered": sum(s >= t for s in answerable) / max(1, len(answerable)),
                     "declined": sum(s < t for s in near_miss) / max(1, len(near_miss))})
    return rows


def choose_threshold(answerable: Sequence[float], near_miss: Sequence[float], *, min_answered: float) -> float:
    """The highest threshold (most near misses declined) that still answers at least ``min_answered``
    of ``answerable`` (candidate thresholds: the answerable scores themselves); ``-inf`` when none does."""
    finite = sorted({s for s in answerable if s != float("-inf")}, reverse=True)
    for t in finite:
        if sum(s >= t for s in answerable) / max(1, len(answerable)) >= min_answered:
            return t
    return float("-inf")


def calibration_split(dialogue: str) -> bool:
    """Whether a ``tune`` dialogue is in the calibration fifth (threshold choice, never trained on)."""
    return hashlib.sha256(f"calibration:{dialogue}".encode()).digest()[0] % 5 == 0


# --- step 1: retrieval and the baselines that need no model ------------------------------------------


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import django

    django.setup()


def collect(args) -> list[dict]:
    """Retrieve for every question and record its candidate sentences and the baselines' decisions
    (see the module docstring). Returns JSON-able records; cached in ``args.cache``."""
    from django.conf import settings

    from chat.answer_metrics import closest_sentence_baseline
    from chat.grounding import GroundingCheck, extractive_answer, source_sentences
    from chat.prompts import source_excerpt, without_markers
    from chat.services.answers import closest_among_sources
    from knowledge.evaluation import load_questions
    from knowledge.selectors import conversation_search

    root = Path(args.questions).resolve().parent
    gold = load_questions(args.questions)
    items = []
    for q in gold:
        if q.split == "tune":
            role = "calibration" if calibration_split(q.dialogue) else "train"
        else:
            role = "heldout"
        items.append({"kind": "answerable", "role": role, "qid": q.qid, "question": q.question,
                      "history": list(q.history), "first_turn": q.is_first_turn, "gold_file": q.gold_file,
                      "answer_start": q.answer_start, "answer_end": q.answer_end, "reference": q.reference_answer,
                      "collection": args.collection})
    heldout_follow = [i for i in items if i["role"] == "heldout" and not i["first_turn"]]
    keep = {id(i) for i in heldout_follow[:: args.heldout_every]}
    items = [i for i in items if not (i["role"] == "heldout" and not i["first_turn"] and id(i) not in keep)]
    near = [json.loads(line) for line in open(args.near_miss, encoding="utf-8") if line.strip()]
    items += [{"kind": "near_miss", "role": "calibration" if n % 2 == 0 else "heldout", "qid": r["qid"],
               "question": r["question"], "history": [], "first_turn": True, "collection": args.collection}
              for n, r in enumerate(near)]
    if args.demo_collection:
        for path, kind in ((args.demo_answerable, "demo_answerable"), (args.demo_near_miss, "demo_near_miss")):
            for r in (json.loads(line) for line in open(path, encoding="utf-8") if line.strip()):
                items.append({"kind": kind, "role": "demo", "qid": r["qid"], "question": r["question"], "history": [],
                              "first_turn": True, "facts": r.get("facts", []), "collection": args.demo_collection})

    encode = CachedEncoder()
    cached = {}
    if args.cache and Path(args.cache).exists():
        cached = {(r["kind"], r["qid"]): r for r in json.loads(Path(args.cache).read_text())}
    records, started = [], time.perf_counter()
    for index, item in enumerate(items, start=1):
        if (item["kind"], item["qid"]) in cached:
            records.append(cached[(item["kind"], item["qid"])])
            continue
        found = conversation_search(item["question"], item["history"], k=settings.RETRIEVAL_K,
                                    collection=item["collection"])
        chunks = closest_among_sources(found.chunks, settings.LLM_PROMPT_SOURCES)
        record = {**item, "distance": found.distance, "query": found.query, "reads_history": found.reads_history}
        sentences = []
        for rank, chunk in enumerate(chunks[: args.k]):
            file = _relative(chunk.source_uri, root)
            texts = source_sentences(chunk.text)
            for text, (start, end) in zip(texts, locate_sentences(chunk.text, texts, base=chunk.start)):
                sentences.append({"file": file, "start": start, "end": end, "text": text, "rank": rank,
                                  "title": without_markers(chunk.source_title)})
        record["candidates"] = sentences
        if item["role"] != "train":
            # The embedder's similarity of each candidate to the question (its topic for a follow-up
            # read with its history, as the check), the pipeline's quote candidates and the check's
            # decision without the model.
            topic = found.query if found.reads_history else None
            vectors = encode([(topic or item["question"]).strip(), *[s["text"] for s in sentences]])
            record["embedder_scores"] = [float(v) for v in vectors[1:] @ vectors[0]]
            quoted = chunks[: max(settings.EXTRACTIVE_SOURCES, settings.LLM_PROMPT_SOURCES)]
            record["declined_by_distance"] = found.distance is None or found.distance > settings.ABSTAIN_MAX_DISTANCE
            record.update(check_quote="", closest_sentence="", product_top_sentence="")
            if quoted:
                check = GroundingCheck(item["question"], [source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS) for c in quoted],
                                       titles=[without_markers(c.source_title) for c in quoted], topic=topic,
                                       prompt_sources=settings.LLM_PROMPT_SOURCES, encode=encode)
                quote = extractive_answer(check, min_relevance=settings.EXTRACTIVE_MIN_RELEVANCE)
                ranked = extractive_answer(check, min_relevance=-2.0, require_type=False)
                record.update(check_quote=quote.text if quote else "", closest_sentence=closest_sentence_baseline(check),
                              product_top_sentence=ranked.text if ranked else "")
        records.append(record)
        if index % 50 == 0:
            print(f"retrieved {index}/{len(items)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            if args.cache:
                Path(args.cache).write_text(json.dumps(records))
    if args.cache:
        Path(args.cache).write_text(json.dumps(records))
    return records


class CachedEncoder:
    """The product's embedding model with a per-text cache (quote candidates repeat the chunks' sentences)."""

    def __init__(self):
        from knowledge.embedding import get_embedding_model

        self.model = get_embedding_model()
        self.cache: dict = {}

    def __call__(self, texts):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, vector in zip(missing, self.model.encode(missing)):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts])


def _relative(uri: str, root: Path) -> str:
    try:
        return str(Path(uri).resolve().relative_to(root))
    except ValueError:
        return uri


def page_sentences(root: Path, file: str, cache: dict) -> list[dict]:
    """The gold page's sentences with offsets (``chat.grounding.source_sentences`` per paragraph)."""
    if file not in cache:
        from chat.grounding import source_sentences

        text = (root / file).read_text(encoding="utf-8")
        texts = source_sentences(text)
        cache[file] = [{"file": file, "start": s, "end": e, "text": t}
                       for t, (s, e) in zip(texts, locate_sentences(text, texts))]
    return cache[file]


# --- step 2: training ---------------------------------------------------------------------------------


def verifier_query(question: str, history: Sequence[dict]) -> str:
    """The verifier's first text: the question, then the two latest earlier user turns
    (``knowledge.selectors.retrieval_query``)."""
    from knowledge.selectors import retrieval_query

    return retrieval_query(question, history)


def train(records: list[dict], args) -> tuple[object, dict]:
    """Fine-tune the cross-encoder on the training records' pairs; returns the model and stats."""
    import torch
    from sentence_transformers import CrossEncoder
    from django.conf import settings

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    root = Path(args.questions).resolve().parent
    pages: dict = {}
    pairs = []
    for r in records:
        if r["kind"] != "answerable" or r["role"] != "train":
            continue
        pairs += question_pairs(verifier_query(r["question"], r["history"]), r["candidates"],
                                page_sentences(root, r["gold_file"], pages), gold_file=r["gold_file"],
                                answer_start=r["answer_start"], answer_end=r["answer_end"],
                                max_retrieved=args.negatives, max_page=args.page_negatives, rng=rng)
    rng.shuffle(pairs)
    model = CrossEncoder(settings.EMBEDDING_MODEL, num_labels=1, max_length=args.max_length, device="cpu")
    network = model[0].model
    tokenizer = model.tokenizer
    # The embeddings and the lowest --freeze-layers layers keep the embedder's weights (CPU budget).
    frozen = [network.bert.embeddings, *network.bert.encoder.layer[: args.freeze_layers]]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad = False
    network.train()
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(pairs) + args.batch_size - 1) // args.batch_size)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started, step, losses = time.perf_counter(), 0, []
    for epoch in range(args.epochs):
        if epoch:
            rng.shuffle(pairs)
        for offset in range(0, len(pairs), args.batch_size):
            batch = pairs[offset: offset + args.batch_size]
            encoded = tokenizer([p[0] for p in batch], [p[1] for p in batch], padding=True, truncation=True,
                                max_length=args.max_length, return_tensors="pt")
            logits = network(**encoded).logits.squeeze(-1)
            loss = loss_fn(logits, torch.tensor([float(p[2]) for p in batch]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{steps} loss {statistics.fmean(losses[-100:]):.4f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    network.eval()
    stats = {"pairs": len(pairs), "positives": sum(p[2] for p in pairs), "steps": steps,
             "train_s": time.perf_counter() - started,
             "questions": sum(1 for r in records if r["kind"] == "answerable" and r["role"] == "train")}
    return model, stats


# --- step 3: scoring and the report -------------------------------------------------------------------


def score_records(model, records: list[dict], args) -> list[float]:
    """Score every evaluated record's candidate sentences (``record["scores"]``); returns per-question
    latencies in ms (one thread)."""
    import torch

    latencies = []
    with torch.inference_mode():
        for r in records:
            if r["role"] == "train":
                continue
            query = verifier_query(r["question"], r["history"])
            started = time.perf_counter()
            ranked = sorted(range(len(r["candidates"])), key=lambda i: -r["embedder_scores"][i])[: args.rerank]
            texts = [r["candidates"][i]["text"] for i in ranked]
            scores = model.predict([(query, t) for t in texts], batch_size=64, activation_fn=torch.nn.Identity(),
                                   convert_to_numpy=True, show_progress_bar=False) if texts else []
            latencies.append((time.perf_counter() - started) * 1000)
            r["scored"] = ranked
            r["scores"] = [float(s) for s in scores]
    return latencies


def best(r: dict) -> float:
    """The question's verifier score: ``-inf`` when declined by distance or nothing retrieved."""
    if r.get("declined_by_distance") or not r.get("scores"):
        return float("-inf")
    return max(r["scores"])


def top_sentence(r: dict) -> dict | None:
    if not r.get("scores"):
        return None
    return r["candidates"][r["scored"][max(range(len(r["scores"])), key=lambda i: r["scores"][i])]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--near-miss", default=str(ROOT / "benchmarks" / "data" / "near_miss_doc2dial.jsonl"))
    parser.add_argument("--demo-collection", default="", help="collection holding demo/knowledge_base (optional)")
    parser.add_argument("--demo-answerable", default=str(ROOT / "benchmarks" / "data" / "demo_answerable.jsonl"))
    parser.add_argument("--demo-near-miss", default=str(ROOT / "benchmarks" / "data" / "near_miss_demo.jsonl"))
    parser.add_argument("--output", required=True, help="folder for the trained model (outside the repository)")
    parser.add_argument("--model", default="", help="score with this saved verifier instead of training one")
    parser.add_argument("--cache", default=None, help="JSON file of step 1's records (read if present, else written)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--k", type=int, default=5, help="retrieved chunks whose sentences are scored")
    parser.add_argument("--heldout-every", type=int, default=3, help="score every n-th held-out follow-up")
    parser.add_argument("--rerank", type=int, default=10,
                        help="score the embedder's closest N candidate sentences (CPU budget)")
    parser.add_argument("--negatives", type=int, default=3, help="retrieved non-answer sentences per question")
    parser.add_argument("--page-negatives", type=int, default=2, help="gold-page sentences nearest the span")
    parser.add_argument("--freeze-layers", type=int, default=3, help="lowest BERT layers left as the embedder's")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per (query, sentence) pair")
    parser.add_argument("--min-answered", type=float, default=0.9)
    args = parser.parse_args()
    if Path(args.output).resolve().is_relative_to(ROOT):
        raise SystemExit("--output must be outside the repository")

    import torch

    torch.set_num_threads(1)
    _setup_django()
    from chat.answer_metrics import token_f1
    from chat.grounding import source_sentences  # noqa: F401  (loaded before timing)

    records = collect(args)
    if args.model:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(args.model, num_labels=1, max_length=args.max_length, device="cpu")
        stats = {"questions": 0, "pairs": 0, "positives": 0, "steps": 0, "train_s": 0.0}
        args.output = args.model
    else:
        model, stats = train(records, args)
        model.save(args.output)
    size_mb = sum(f.stat().st_size for f in Path(args.output).rglob("*") if f.is_file()) / 1e6
    latencies = score_records(model, records, args)

    def group(kind, role, first=None):
        return [r for r in records if r["kind"] == kind and r["role"] == role
                and (first is None or r["first_turn"] == first)]

    calib_answerable, calib_near = group("answerable", "calibration"), group("near_miss", "calibration")
    held_first, held_follow = group("answerable", "heldout", True), group("answerable", "heldout", False)
    held_near = group("near_miss", "heldout")
    held_all = held_first + held_follow

    # Thresholds chosen on the calibration records (answerable all turns + near-miss even rows).
    t_verifier = choose_threshold([best(r) for r in calib_answerable], [best(r) for r in calib_near],
                                  min_answered=args.min_answered)

    def embedder(r):
        if r.get("declined_by_distance") or not r.get("embedder_scores"):
            return float("-inf")
        return max(r["embedder_scores"])

    t_embedder = choose_threshold([embedder(r) for r in calib_answerable], [embedder(r) for r in calib_near],
                                  min_answered=args.min_answered)

    def answered_share(rows, decide):
        return sum(decide(r) for r in rows) / max(1, len(rows))

    systems = {
        "distance threshold only (ABSTAIN_MAX_DISTANCE)": lambda r: not r["declined_by_distance"],
        "current check, no model (quote at EXTRACTIVE_MIN_RELEVANCE)": lambda r: (not r["declined_by_distance"]
                                                                                   and bool(r["check_quote"])),
        f"embedder best cosine >= {t_embedder:.3f} (chosen on tune)": lambda r: embedder(r) >= t_embedder,
        f"verifier best score >= {t_verifier:.3f} (chosen on tune)": lambda r: best(r) >= t_verifier,
    }
    print(f"\nTraining: {stats['questions']} tune questions, {stats['pairs']} pairs ({stats['positives']} positive), "
          f"{stats['steps']} steps, {stats['train_s']:.0f} s (1 thread); model {size_mb:.1f} MB at {args.output}; "
          f"scoring p50 / p95 {statistics.median(latencies):.0f} / "
          f"{sorted(latencies)[int(0.95 * (len(latencies) - 1))]:.0f} ms per question "
          f"({statistics.fmean(len(r['scores']) for r in records if r['role'] != 'train'):.1f} pairs scored of "
          f"{statistics.fmean(len(r['candidates']) for r in records if r['role'] != 'train'):.1f} candidate sentences)\n")

    print("| system | tune: answerable answered (all turns, %d) | tune: near-miss declined (%d) | held-out: first turns "
          "answered (%d) | held-out: all turns answered (%d) | held-out: near-miss declined (%d) | all 84 near-miss declined |"
          % (len(calib_answerable), len(calib_near), len(held_first), len(held_all), len(held_near)))
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, decide in systems.items():
        print(f"| {name} | {answered_share(calib_answerable, decide):.3f} | {1 - answered_share(calib_near, decide):.3f} | "
              f"{answered_share(held_first, decide):.3f} | {answered_share(held_all, decide):.3f} | "
              f"{1 - answered_share(held_near, decide):.3f} | {1 - answered_share(calib_near + held_near, decide):.3f} |")

    # The ceiling: a perfect verifier answers only where a gold-span sentence is among those it scores.
    def gold_retrieved(r):
        return not r["declined_by_distance"] and any(
            c["file"] == r["gold_file"] and span_label(c["start"], c["end"], r["answer_start"], r["answer_end"]) == 1
            for c in (r["candidates"][i] for i in r.get("scored", [])))

    print(f"\nGold answer sentence among the scored candidates (ceiling of a perfect verifier's answered share): "
          f"tune {answered_share(calib_answerable, gold_retrieved):.3f}, held-out first turns "
          f"{answered_share(held_first, gold_retrieved):.3f}, held-out all turns {answered_share(held_all, gold_retrieved):.3f}")

    print("\nTrade-off on held-out (verifier threshold sweep; answerable answered vs near-miss declined):\n")
    print("| threshold | first turns answered | all turns answered | answered with a gold sentence on top (all turns) | "
          "near-miss declined (held-out 42) | near-miss declined (all 84) | embedder at the same answered share: near-miss declined (all 84) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    finite = sorted(s for r in held_all for s in [best(r)] if s != float("-inf"))
    quantiles = sorted({round(finite[int(q * (len(finite) - 1))], 3) for q in
                        (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)} | {round(t_verifier, 3)})
    all_near = calib_near + held_near
    for t in quantiles:
        a_first = answered_share(held_first, lambda r: best(r) >= t)
        a_all = answered_share(held_all, lambda r: best(r) >= t)
        on_gold = answered_share(held_all, lambda r: best(r) >= t and (top_sentence(r) or {}).get("file") == r["gold_file"]
                                 and span_label(top_sentence(r)["start"], top_sentence(r)["end"], r["answer_start"],
                                                r["answer_end"]) == 1)
        # The embedder's threshold answering the same share of held-out all turns, for comparison.
        e_scores = sorted((embedder(r) for r in held_all), reverse=True)
        e_t = e_scores[max(0, int(round(a_all * len(e_scores))) - 1)] if a_all > 0 else float("inf")
        print(f"| {t:.3f}{' (chosen)' if t == round(t_verifier, 3) else ''} | {a_first:.3f} | {a_all:.3f} | {on_gold:.3f} | "
              f"{1 - answered_share(held_near, lambda r: best(r) >= t):.3f} | "
              f"{1 - answered_share(all_near, lambda r: best(r) >= t):.3f} | "
              f"{1 - answered_share(all_near, lambda r: embedder(r) >= e_t):.3f} |")

    # Extractive answers: the verifier's top sentence vs the product's quote rankings (held-out).
    def f1(rows, text):
        return statistics.fmean(token_f1(text(r), r["reference"]) if not r["declined_by_distance"] else 0.0 for r in rows)

    print("\nToken-F1 of one quoted sentence, always answering unless the distance threshold declines (held-out):\n")
    print(f"| extractive answer | first turns ({len(held_first)}) | all turns ({len(held_all)}) |")
    print("|---|---:|---:|")
    quotes = {
        "closest sentence of the 3 quote sources (closest_sentence_baseline)": lambda r: r["closest_sentence"],
        "product quote ranking, no threshold (extractive_answer)": lambda r: r["product_top_sentence"],
        f"embedder closest of the top-{args.k} chunks' sentences": lambda r: _embedder_top(r),
        f"verifier top sentence of the top-{args.k} chunks": lambda r: (top_sentence(r) or {}).get("text", ""),
    }
    for name, text in quotes.items():
        print(f"| {name} | {f1(held_first, text):.3f} | {f1(held_all, text):.3f} |")

    demo_answerable, demo_near = group("demo_answerable", "demo"), group("demo_near_miss", "demo")
    if demo_answerable or demo_near:
        print(f"\nDemo store (threshold chosen on Doc2Dial tune, {t_verifier:.3f}):\n")
        print(f"| system | answerable answered ({len(demo_answerable)}) | answered with the expected fact in its "
              f"shown sentence | near-miss declined ({len(demo_near)}) |")
        print("|---|---:|---:|---:|")
        # Each system's own shown sentence: the check's quote, the embedder's or the verifier's top sentence
        # (the distance threshold alone: the product's quote ranking without a threshold).
        shown = [lambda r: r["product_top_sentence"], lambda r: r["check_quote"], _embedder_top,
                 lambda r: (top_sentence(r) or {}).get("text", "")]
        for (name, decide), text in zip(systems.items(), shown):
            fact = sum(decide(r) and all(f.lower() in text(r).lower() for f in r["facts"])
                       for r in demo_answerable) / max(1, len(demo_answerable))
            print(f"| {name} | {answered_share(demo_answerable, decide):.3f} | {fact:.3f} | "
                  f"{1 - answered_share(demo_near, decide):.3f} |")


def _embedder_top(r: dict) -> str:
    """The candidate sentence closest to the question by the product's embedding model (the same
    candidates as the verifier's top sentence)."""
    scores = r.get("embedder_scores") or []
    return r["candidates"][max(range(len(scores)), key=scores.__getitem__)]["text"] if scores else ""


if __name__ == "__main__":
    main()
