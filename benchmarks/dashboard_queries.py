"""What the agents' dashboard costs the database and the embedding model: the analytics page's
content gaps and the inbox an open dashboard re-fetches on every ``inbox.changed`` event.

What it measures
    Seeds ``--conversations`` conversations (default 20,000) of four messages each (question,
    answer, question, answer; about one in eight answers abstained, one in twenty handed off with a
    system message), ``--questions`` of the abstained questions (default 500) distinct, as customers
    ask them ("Do you sell kayaks?", "Can I rent a tent in Oslo?", ...); then ``VACUUM ANALYZE``.
    Then, through the real views (Django's test ``Client`` logged in as an agent):
    - the analytics page (``/dashboard/analytics/``): SQL queries (``CaptureQueriesContext``),
      wall-clock time, and how many texts it embeds and for how long it holds the process-wide
      embedding lock (``knowledge.embedding`` wraps ``encode`` in it; customers' retrieval in the same
      process waits meanwhile). When the code precomputes question embeddings
      (``chat.services.unanswered_questions_embed``), that precomputation is run first and
      timed on its own line: it runs in a Celery worker, not in the page's request;
    - the inbox fragment (``/dashboard/inbox/list/``, what ``dashboard.js`` re-fetches): queries,
      wall-clock time (median of ``--repeat``), and the plan's execution time from
      ``EXPLAIN (ANALYZE)`` of its SQL.
Units: milliseconds of wall-clock time in this process (``time.perf_counter``, including the
Django/psycopg round trip over the Unix socket); counts are exact.

How to run (from the project root; a database of its own, the seeded rows are deleted at the end
unless ``--keep``):
    EMBEDDED_SERVICES=1 DATABASE_NAME=bench python manage.py migrate     # once
    EMBEDDED_SERVICES=1 DATABASE_NAME=bench python benchmarks/dashboard_queries.py \
        [--conversations 20000] [--questions 500] [--repeat 5] [--keep]

Figures go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import django_setup  # noqa: E402

BENCH_ORIGIN = "https://dashboard-bench.invalid"
PRODUCTS = ["kayaks", "tents", "gift cards", "bike helmets", "ski boots", "paddle boards", "camping stoves",
            "sleeping bags", "climbing ropes", "trail shoes", "hammocks", "headlamps", "water filters",
            "snowshoes", "fishing rods", "yoga mats", "rain jackets", "backpacks", "tarps", "compasses"]
TEMPLATES = ["Do you sell {p}?", "Can I rent {p} in {c}?", "Are {p} on sale in {c}?", "Do you repair {p}?",
             "How much is shipping for {p} to {c}?", "Can I pick up {p} in {c}?", "Do you stock {p} in {c}?"]
CITIES = ["Oslo", "Lyon", "Austin", "Kyoto", "Perth"]


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def question_texts(n: int) -> list[str]:
    """``n`` distinct customer questions (products x templates x cities, in a mixed order)."""
    combos = itertools.product(TEMPLATES, CITIES, PRODUCTS)
    texts = list(dict.fromkeys(t.format(p=p, c=c) for t, c, p in combos))
    if n > len(texts):
        raise SystemExit(f"--questions at most {len(texts)}")
    return texts[:: max(1, len(texts) // n)][:n] if n else []


def seed(conversations: int, questions: int) -> None:
    from django.db import connection
    from django.utils import timezone

    from chat.models import Conversation, Message

    gaps = question_texts(questions)
    now = timezone.now()
    log(f"seeding {conversations} conversations ...")
    batch = 2000
    for first in range(0, conversations, batch):
        rows = [Conversation(origin=BENCH_ORIGIN, collection="default") for _ in range(first, min(first + batch, conversations))]
        Conversation.objects.bulk_create(rows)
        messages = []
        for offset, conversation in enumerate(rows):
            i = first + offset
            at = now - timedelta(minutes=conversations - i)
            abstain = i % 8 == 0
            question = gaps[(i // 8) % len(gaps)] if abstain and gaps else f"How long does delivery {i} take?"
            messages += [
                Message(conversation=conversation, role="user", text="Hi, a question about my order", created_at=at),
                Message(conversation=conversation, role="assistant", text="Happy to help.", created_at=at + timedelta(seconds=1)),
                Message(conversation=conversation, role="user", text=question, created_at=at + timedelta(seconds=2)),
                Message(conversation=conversation, role="assistant", created_at=at + timedelta(seconds=3),
                        text="I couldn't find this." if abstain else "Five business days.", abstained=abstain,
                        timings={"ttft_ms": 300.0 + i % 100}),
            ]
            if i % 20 == 0:
                kind = {"kind": "handoff"} if hasattr(Message, "Kind") else {}  # the field came with issue 13
                messages.append(Message(conversation=conversation, role="system", created_at=at + timedelta(seconds=4),
                                        text="The customer asked to talk to a person.", **kind))
        Message.objects.bulk_create(messages)
        # auto_now fields ignore the values given: spread the activity times like real traffic.
        Conversation.objects.filter(pk__in=[c.pk for c in rows]).update(updated_at=now)
        log(f"  {first + len(rows)}")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE chat_conversation c SET updated_at = (SELECT max(created_at) FROM chat_message m "
                       "WHERE m.conversation_id = c.id) WHERE origin = %s", [BENCH_ORIGIN])
        cursor.execute("VACUUM ANALYZE chat_conversation")
        cursor.execute("VACUUM ANALYZE chat_message")


def cleanup() -> None:
    from chat.models import Conversation

    log("deleting the seeded conversations ...")
    Conversation.objects.filter(origin=BENCH_ORIGIN).delete()


class EncodeSpy:
    """Counts the texts ``EmbeddingModel.encode`` embeds and the seconds spent inside it (the
    embedding lock is held for the whole call)."""

    def __init__(self):
        self.texts = 0
        self.seconds = 0.0

    def __enter__(self):
        from knowledge import embedding

        self._original = original = embedding.EmbeddingModel.encode
        spy = self

        def encode(model, texts, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(model, texts, *args, **kwargs)
            finally:
                spy.seconds += time.perf_counter() - started
                spy.texts += len(texts)

        embedding.EmbeddingModel.encode = encode
        return self

    def __exit__(self, *exc):
        from knowledge import embedding

        embedding.EmbeddingModel.encode = self._original


def timed_get(client, url: str) -> tuple[float, int, int]:
    """``(ms, queries, status)`` of one GET."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        response = client.get(url)
        ms = (time.perf_counter() - started) * 1000
    return ms, len(queries), response.status_code


def inbox_plan_ms() -> tuple[float, str]:
    """Execution time (ms) of the inbox's SQL by ``EXPLAIN (ANALYZE)``, and the plan's top node."""
    from django.db import connection

    from chat import agent_selectors

    sql, params = agent_selectors.inbox_list().query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        plan = cursor.fetchone()[0][0]
    return plan["Execution Time"], plan["Plan"]["Node Type"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    django_setup()
    from django.contrib.auth.models import User
    from django.test import Client

    from chat.models import Conversation, Message
    from knowledge.embedding import get_embedding_model

    get_embedding_model()  # loaded before timing (a web process loads it at start-up)
    if not Conversation.objects.filter(origin=BENCH_ORIGIN).exists():
        seed(args.conversations, args.questions)
    agent, _ = User.objects.get_or_create(username="dashboard-bench", defaults={"is_staff": True})
    client = Client()
    client.force_login(agent)
    try:
        total = Conversation.objects.count()
        print(f"database: {total} conversations, {Message.objects.count()} messages, "
              f"{Message.objects.filter(role='assistant', abstained=True).count()} abstained answers")
        from chat import services

        if hasattr(services, "unanswered_questions_embed"):
            with EncodeSpy() as spy:
                started = time.perf_counter()
                stored = services.unanswered_questions_embed(limit=None)
                ms = (time.perf_counter() - started) * 1000
            print(f"precompute (Celery worker, once per new question): {stored} question embeddings stored in "
                  f"{ms:.0f} ms, {spy.texts} texts embedded ({spy.seconds * 1000:.0f} ms in encode)")
        runs = []
        for _ in range(args.repeat):
            with EncodeSpy() as spy:
                runs.append((*timed_get(client, "/dashboard/analytics/"), spy.texts, spy.seconds * 1000))
        ms = statistics.median(r[0] for r in runs)
        queries, status, texts, encode_ms = runs[-1][1], runs[-1][2], runs[-1][3], statistics.median(r[4] for r in runs)
        print(f"analytics page: HTTP {status}, {queries} SQL queries, median {ms:.0f} ms of {args.repeat}, "
              f"{texts} texts embedded per view, {encode_ms:.0f} ms holding the embedding lock per view")
        runs = [timed_get(client, "/dashboard/inbox/list/") for _ in range(args.repeat)]
        print(f"inbox fragment: HTTP {runs[-1][2]}, {runs[-1][1]} SQL queries, "
              f"median {statistics.median(r[0] for r in runs):.1f} ms of {args.repeat}")
        plans = [inbox_plan_ms() for _ in range(args.repeat)]
        print(f"inbox SQL, EXPLAIN ANALYZE: median execution {statistics.median(p[0] for p in plans):.1f} ms "
              f"(top node {plans[-1][1]})")
    finally:
        agent.delete()
        if not args.keep:
            cleanup()


if __name__ == "__main__":
    main()
