"""``manage.py evaluate_answers --questions FILE [--limit N] [--collection C] [--first-turns]``:
answer quality and speed of the answer pipeline on gold questions (Doc2Dial's format).

Each question is asked through ``chat.services.answer_stream``, the pipeline the widget uses, in a
fresh conversation holding the question's history (customer turns as ``user``, agent turns as
``agent`` messages), so follow-ups are retrieved with their history. Conversations made here are
deleted at the end unless ``--keep``.

Metrics (answered = not abstained; all questions are answerable from their gold page):

- answered / abstained;
- citation validity: source numbers written by the model that name a source of its prompt, over all
  it wrote (``chat.done``'s ``citation_markers``), and the share of answers with a valid citation;
- citation precision: cited chunks overlapping the gold span (``knowledge.evaluation.passage_hit``:
  same file, overlapping ``[answer_start, answer_end)``), over all cited chunks; also split by who
  placed the citation (the model's markers, or post-hoc attribution by overlap);
- gold passage in prompt: answered questions whose gold passage was among the prompt's sources (the
  ceiling for citation precision);
- token-F1 against ``reference_answer`` (SQuAD v1.1's normalisation: lower case, punctuation and
  articles removed; Rajpurkar et al. 2016), citation markers stripped; over answered questions, and
  over all with abstentions scored 0;
- TTFT p50/p95 (question received to the model's first token, ms), time to first shown text p50/p95
  (after the groundedness check) and decode tokens/s, over answered questions;
- the groundedness check: the method mix (generated / extractive / declined; a question that asks
  for a person is handed over and counted as abstained), sentences the model
  wrote and the share shown, and invented facts in shown answers (links, e-mails, phone numbers,
  numbers, months or codes absent from the prompt's sources, ``chat.answer_metrics.invented_facts``);
- an extractive baseline computed in the same run on the same retrieval: the sentence of the prompt's
  sources closest to the question by the product's embedding model, always answering;
- with ``--unanswerable FILE`` (JSON lines with ``question``: on-topic questions no page answers,
  e.g. ``benchmarks/data/near_miss_doc2dial.jsonl``), the share of them declined.

``--split tune|heldout`` keeps one fixed half of the dialogues (``GoldQuestion.split``): thresholds are
chosen on ``tune`` and reported on ``heldout``.
"""

from __future__ import annotations

import collections
import json
import statistics
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.answer_metrics import closest_sentence_baseline, invented_facts, token_f1
from chat.grounding import GroundingCheck
from chat.prompts import source_excerpt, without_markers
from chat.models import Conversation, Message
from knowledge.evaluation import RankedPassage, load_questions, passage_hit, percentile
from knowledge.models import Chunk
from knowledge.selectors import conversation_search

class Command(BaseCommand):
    help = "Evaluate the answer pipeline (abstention, citations, token-F1, TTFT, tokens/s) on gold questions."

    def add_arguments(self, parser):
        parser.add_argument("--questions", required=True, help="JSON-lines question file (Doc2Dial format)")
        parser.add_argument("--docs-root", default=None,
                            help="folder gold_file paths are relative to (default: the questions file's folder)")
        parser.add_argument("--collection", default="default")
        parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions (after --first-turns)")
        parser.add_argument("--first-turns", action="store_true", help="only questions without history")
        parser.add_argument("--keep", action="store_true", help="keep the evaluation conversations")
        parser.add_argument("--show", type=int, default=0, help="print the first N answers")
        parser.add_argument("--split", choices=["tune", "heldout", "all"], default="all",
                            help="one fixed half of the dialogues (tune: where thresholds were chosen)")
        parser.add_argument("--unanswerable", default=None,
                            help="JSON lines of on-topic questions no page answers: report the share declined")

    def handle(self, *args, questions, docs_root, collection, limit, first_turns, keep, show, split, unanswerable,
               **options):
        path = Path(questions)
        if not path.exists():
            raise CommandError(f"no such file: {questions}")
        root = Path(docs_root or path.parent).resolve()
        gold = load_questions(path)
        if first_turns:
            gold = [q for q in gold if q.is_first_turn]
        if split != "all":
            gold = [q for q in gold if q.split == split]
        gold = gold[:limit] if limit else gold
        if not gold:
            raise CommandError("no questions")

        relative: dict[str, str] = {}

        def file_of(uri: str) -> str:
            if uri not in relative:
                try:
                    relative[uri] = str(Path(uri).resolve().relative_to(root))
                except ValueError:
                    relative[uri] = uri
            return relative[uri]

        rows = []
        near_miss: list[dict] = []
        made: list = []
        started = time.perf_counter()
        try:
            for index, question in enumerate(gold, start=1):
                conversation = services.conversation_start(collection=collection, origin="evaluate_answers")
                made.append(conversation.pk)
                Message.objects.bulk_create([
                    Message(conversation=conversation, role=Message.Role.USER if turn.get("role") == "user"
                            else Message.Role.AGENT, text=turn.get("text", ""))
                    for turn in question.history
                ])
                events = list(services.answer_stream(conversation.pk, question.question))
                final = events[-1]
                if final.type == "chat.agent_active" and final.data.get("status") == "needs_human":
                    # it asked for a person and was handed over: not answered by the bot
                    rows.append(self.handed_over(question, collection))
                    continue
                if final.type != "chat.done":
                    raise CommandError(f"question {question.qid}: {final.type} {final.data}")
                message = Message.objects.get(pk=final.data["message_id"])
                chunk_ids = [c["chunk_id"] for c in message.citations]
                prompt_ids = [r["chunk_id"] for r in message.retrieval[: settings.LLM_PROMPT_SOURCES]]
                # a quote may come from the first EXTRACTIVE_SOURCES chunks: facts are checked against those
                quotable_ids = [r["chunk_id"] for r in message.retrieval[
                    : max(settings.LLM_PROMPT_SOURCES, settings.EXTRACTIVE_SOURCES)]]
                loaded = Chunk.objects.select_related("source").only(
                    "start", "end", "text", "source__uri", "source__title").in_bulk(chunk_ids + quotable_ids)
                spans = {pk: (file_of(c.source.uri), c.start, c.end) for pk, c in loaded.items()}
                prompt = [loaded[pk] for pk in prompt_ids if pk in loaded]
                texts = [f"{without_markers(c.source.title)}. {source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS)}"
                         for c in (loaded[pk] for pk in quotable_ids if pk in loaded)]
                baseline = closest_sentence_baseline(GroundingCheck(
                    question.question, [source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS) for c in prompt],
                    titles=[without_markers(c.source.title) for c in prompt]))
                grounding = message.grounding or {}

                def hit(chunk_id):
                    return chunk_id in spans and passage_hit(RankedPassage(*spans[chunk_id]), question)

                rows.append({
                    "question": question,
                    "abstained": message.abstained,
                    "text": message.text,
                    "markers": final.data.get("citation_markers", {"total": 0, "valid": 0}),
                    "cited": len(chunk_ids),
                    "cited_hits": sum(hit(c) for c in chunk_ids),
                    "cited_by": collections.Counter(c.get("method", "model") for c in message.citations),
                    "hits_by": collections.Counter(c.get("method", "model") for c in message.citations
                                                   if hit(c["chunk_id"])),
                    "gold_in_prompt": any(hit(c) for c in prompt_ids),
                    "f1": 0.0 if message.abstained else token_f1(message.text, question.reference_answer),
                    "baseline_f1": token_f1(baseline, question.reference_answer) if baseline else 0.0,
                    "method": grounding.get("method", "declined" if message.abstained else "generated"),
                    "sentences": len(grounding.get("sentences", [])),
                    "shown_sentences": sum(bool(v.get("shown")) for v in grounding.get("sentences", [])),
                    "invented": [] if message.abstained else invented_facts(message.text, texts),
                    "timings": message.timings,
                })
                if index <= show:
                    self.stdout.write(f"\n[{question.qid}] {question.question}\n-> {message.text}\n"
                                      f"   citations {[c['n'] for c in message.citations]}, "
                                      f"F1 {rows[-1]['f1']:.2f}, gold in prompt {rows[-1]['gold_in_prompt']}")
                if index % 10 == 0:
                    self.stderr.write(f"{index}/{len(gold)} questions ({time.perf_counter() - started:.0f} s)")
            for index, line in enumerate(open(unanswerable, encoding="utf-8") if unanswerable else (), start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                conversation = services.conversation_start(collection=collection, origin="evaluate_answers")
                made.append(conversation.pk)
                final = list(services.answer_stream(conversation.pk, row["question"]))[-1]
                if final.type == "chat.agent_active" and final.data.get("status") == "needs_human":
                    near_miss.append({"question": row["question"], "abstained": True, "text": ""})
                    continue
                if final.type != "chat.done":
                    raise CommandError(f"unanswerable {row.get('qid')}: {final.type} {final.data}")
                near_miss.append({"question": row["question"], "abstained": final.data["abstained"],
                                  "text": final.data["text"]})
                if index <= show:
                    self.stdout.write(f"\n[near miss] {row['question']}\n-> {final.data['text']}")
        finally:
            if not keep:
                Conversation.objects.filter(pk__in=made).delete()

        self.stdout.write("\n" + self.table(rows) + "\n")
        if near_miss:
            declined = sum(r["abstained"] for r in near_miss)
            self.stdout.write(f"\nunanswerable questions declined: {declined} of {len(near_miss)} "
                              f"({declined / len(near_miss):.3f})\n")

    @staticmethod
    def handed_over(question, collection: str) -> dict:
        """The row of a question the pipeline handed to a person (``chat.intents.asks_for_a_person``):
        unanswered (F1 0), with the extractive baseline computed on the retrieval the pipeline would
        have used, so the baseline still answers every question."""
        found = conversation_search(question.question, list(question.history), k=settings.RETRIEVAL_K,
                                    collection=collection)
        prompt = services.closest_among_sources(found.chunks, settings.LLM_PROMPT_SOURCES)[: settings.LLM_PROMPT_SOURCES]
        baseline = closest_sentence_baseline(GroundingCheck(
            question.question, [source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS) for c in prompt],
            titles=[without_markers(c.source_title) for c in prompt]))
        return {"question": question, "abstained": True, "text": "", "markers": {"total": 0, "valid": 0},
                "cited": 0, "cited_hits": 0, "cited_by": collections.Counter(), "hits_by": collections.Counter(),
                "gold_in_prompt": False, "f1": 0.0,
                "baseline_f1": token_f1(baseline, question.reference_answer) if baseline else 0.0,
                "method": "handed over", "sentences": 0, "shown_sentences": 0, "invented": [], "timings": {}}

    @staticmethod
    def table(rows: list[dict]) -> str:
        """The Markdown table of the metrics over ``rows``, first turns and all rows."""
        groups = {"first turns": [r for r in rows if r["question"].is_first_turn], "all": rows}
        groups = {name: group for name, group in groups.items() if group}
        if len(groups) == 2 and len(groups["first turns"]) == len(rows):
            del groups["all"]
        names = list(groups)
        lines = ["| metric | " + " | ".join(f"{n} ({len(groups[n])})" for n in names) + " |",
                 "|---|" + "---:|" * len(names)]

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.3f}" if b else "–"

        def row(label, compute):
            lines.append(f"| {label} | " + " | ".join(compute(groups[n]) for n in names) + " |")

        def answered(group):
            return [r for r in group if not r["abstained"]]

        row("answered", lambda g: f"{len(answered(g))} ({ratio(len(answered(g)), len(g))})")
        row("abstained", lambda g: f"{len(g) - len(answered(g))} ({ratio(len(g) - len(answered(g)), len(g))})")
        row("citation validity (valid markers / markers)",
            lambda g: f"{ratio(sum(r['markers']['valid'] for r in g), sum(r['markers']['total'] for r in g))} "
                      f"({sum(r['markers']['total'] for r in g)} markers)")
        row("answers with a valid citation", lambda g: ratio(sum(r["cited"] > 0 for r in answered(g)), len(answered(g))))
        row("citation precision (cited chunks on the gold span)",
            lambda g: f"{ratio(sum(r['cited_hits'] for r in g), sum(r['cited'] for r in g))} ({sum(r['cited'] for r in g)} cited)")
        for method, label in (("model", "written by the model"), ("check", "placed by the check"),
                              ("extractive", "of quoted sentences")):
            row(f"  citations {label}: precision",
                lambda g, m=method: f"{ratio(sum(r['hits_by'][m] for r in g), sum(r['cited_by'][m] for r in g))} "
                                    f"({sum(r['cited_by'][m] for r in g)} cited)")
        row("gold passage in the prompt (answered)",
            lambda g: ratio(sum(r["gold_in_prompt"] for r in answered(g)), len(answered(g))))
        row("token-F1 vs reference (answered)",
            lambda g: f"{statistics.fmean([r['f1'] for r in answered(g)]):.3f}" if answered(g) else "–")
        row("token-F1 vs reference (all, abstained = 0)", lambda g: f"{statistics.fmean([r['f1'] for r in g]):.3f}")
        row("extractive baseline token-F1 (same retrieval, always answers)",
            lambda g: f"{statistics.fmean([r['baseline_f1'] for r in g]):.3f}")
        row("token-F1 ratio to the extractive baseline",
            lambda g: ratio(statistics.fmean([r['f1'] for r in g]), statistics.fmean([r['baseline_f1'] for r in g])))
        row("method: generated / extractive / declined",
            lambda g: " / ".join(str(sum(r["method"] == m for r in g)) for m in ("generated", "extractive", "declined")))
        if any(r["method"] == "handed over" for r in rows):
            row("asked for a person: handed over (counted as abstained)",
                lambda g: str(sum(r["method"] == "handed over" for r in g)))
        row("sentences written by the model, share shown",
            lambda g: f"{sum(r['sentences'] for r in g)} ({ratio(sum(r['shown_sentences'] for r in g), sum(r['sentences'] for r in g))})")
        row("invented facts in shown answers (links, e-mails, numbers...)", lambda g: str(sum(len(r["invented"]) for r in g)))
        row("TTFT p50 (ms)", lambda g: f"{percentile([r['timings']['ttft_ms'] for r in answered(g)], 50):.0f}")
        row("TTFT p95 (ms)", lambda g: f"{percentile([r['timings']['ttft_ms'] for r in answered(g)], 95):.0f}")
        row("time to first shown text p50 / p95 (ms)",
            lambda g: f"{percentile([r['timings'].get('first_text_ms', r['timings']['ttft_ms']) for r in answered(g)], 50):.0f} / "
                      f"{percentile([r['timings'].get('first_text_ms', r['timings']['ttft_ms']) for r in answered(g)], 95):.0f}")
        def generated(group):
            return [r for r in group if r["method"] == "generated"]

        row("what the check adds to first text, generated answers p50 / p95 (ms)",
            lambda g: (f"{percentile([r['timings']['first_text_ms'] - r['timings']['ttft_ms'] for r in generated(g)], 50):.0f} / "
                       f"{percentile([r['timings']['first_text_ms'] - r['timings']['ttft_ms'] for r in generated(g)], 95):.0f}")
            if generated(g) else "–")
        row("retrieval p50 (ms)", lambda g: f"{percentile([r['timings']['retrieval_ms'] for r in g if r['timings']], 50):.0f}")
        row("tokens per answer (mean)",
            lambda g: f"{statistics.fmean([r['timings']['tokens'] for r in answered(g)]):.1f}" if answered(g) else "–")
        def decoded(group):  # quoted-first answers never ran the model: their 0 tokens/s is no rate
            return [r for r in answered(group) if r["timings"].get("tokens")]

        row("tokens/s (decode, p50, answers the model wrote)",
            lambda g: f"{percentile([r['timings']['tokens_per_s'] for r in decoded(g)], 50):.1f}" if decoded(g) else "–")
        return "\n".join(lines)
