"""``manage.py seed_training_data --questions FILE [--collection C] [--docs-root DIR] [--limit N]
[--dialogues-from I --dialogues-to J] [--unanswerable FILE]``: approved, seeded training examples
from a question file with reference passages (``tuning.seeding.training_data_seed``), e.g.
``../shared/data/doc2dial/questions_dev.jsonl`` after ``manage.py ingest ../shared/data/doc2dial/docs
--collection doc2dial``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from knowledge.evaluation import load_questions
from tuning.seeding import dialogue_of, question_lines, training_data_seed


class Command(BaseCommand):
    help = "Build approved (seeded) training examples from questions with reference passages."

    def add_arguments(self, parser):
        parser.add_argument("--questions", required=True, help="JSON-lines question file (Doc2Dial format)")
        parser.add_argument("--collection", default="default", help="collection the gold pages were ingested into")
        parser.add_argument("--docs-root", help="folder gold_file paths are relative to (default: the file's folder)")
        parser.add_argument("--limit", type=int, help="seed at most N questions (after the dialogue range)")
        parser.add_argument("--dialogues", help="only dialogues I..J of the file in order of appearance, e.g. 0:40 "
                            "(keeps other dialogues for evaluation)")
        parser.add_argument("--unanswerable", help="text file of questions the knowledge base cannot answer, one per "
                            "line, # comments (seeded with the abstention answer)")

    def handle(self, *args, questions, collection, docs_root, limit, dialogues, unanswerable, **options):
        path = Path(questions)
        if not path.is_file():
            raise CommandError(f"no such file: {questions}")
        try:
            gold = load_questions(path)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if dialogues:
            try:
                first, last = (int(x) for x in dialogues.split(":"))
            except ValueError:
                raise CommandError("--dialogues takes I:J, e.g. 0:40") from None
            wanted = set(list(dict.fromkeys(dialogue_of(q) for q in gold))[first:last])
            gold = [q for q in gold if dialogue_of(q) in wanted]
        gold = gold[:limit] if limit else gold
        extra = []
        if unanswerable:
            if not Path(unanswerable).is_file():
                raise CommandError(f"no such file: {unanswerable}")
            extra = question_lines(Path(unanswerable).read_text(encoding="utf-8"))
        report = training_data_seed(gold, docs_root=docs_root or path.parent, collection=collection, unanswerable=extra)
        self.stdout.write(f"seeded {report.created} approved example(s) ({report.curated} served as curated "
                          f"answers); {report.existing} already seeded; {len(report.skipped)} skipped")
        for reason, count in sorted(Counter(report.skipped.values()).items()):
            self.stdout.write(f"  skipped {count}: {reason}")
        if not report.created and not report.existing:
            raise CommandError("nothing seeded (is the knowledge base ingested into --collection?)")
