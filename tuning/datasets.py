"""Dataset snapshots: training examples built from approved corrections with the RAFT recipe.

RAFT (Zhang et al., 2024, "RAFT: Adapting Language Model to Domain Specific RAG", arXiv:2403.10131)
trains a model to answer from retrieved documents by mixing, in each prompt, the documents that hold
the answer ("oracle") with distractor documents, and by leaving the oracle out of a share of the
prompts. Here:

- the sources of a prompt are the correction's supporting chunks (the gold) plus distractors: chunks
  that retrieval really returned for that question and that do not support the answer (the
  correction's ``shown_chunks``), up to ``sources_per_prompt`` sources, in a seeded random order;
- with probability ``gold_share`` (RAFT's P) an example keeps its gold; otherwise its prompt holds only
  distractors and the target is the pipeline's abstention answer (``chat.services.ABSTAIN_MESSAGE``), so
  the model learns to decline when the sources do not answer; RAFT's original keeps the answer there
  (to memorise the domain), which for a support bot would teach guessing;
- the target is the corrected answer with its ``[n]`` citation markers renumbered to where its
  chunks sit in the new prompt (a marker naming a chunk not in the prompt is dropped; an answer
  without markers gets each gold source's number after the sentences whose words that source holds,
  ``place_markers``), so the model learns to cite the gold where its evidence is;
- the prompt is exactly the serving prompt (``chat.prompts.grounded_messages``: sources, question,
  instruction in one user message); earlier turns are not in it, as in serving, where they only
  shape the retrieval query (they are kept in the record's metadata).

A fixed share of corrections is held out: the split is a function of the correction's group (its
conversation, or its dialogue for seeded corrections) and ``holdout_share`` only, so a held-out
correction is never trained on in any snapshot made with that share. Held-out examples always keep
their gold (they are the evaluation's reference answers). Stale and unapproved corrections are
excluded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Max

from chat.citations import MARKER, marker_numbers
from chat.prompts import grounded_messages
from chat.services import ABSTAIN_MESSAGE
from tuning.models import Correction, TrainingDataset, TrainingExample
from tuning.services import _as_retrieved, correction_sources, corrections_flag_stale


class DatasetError(ValueError):
    """A dataset cannot be built (e.g. no approved corrections); nothing is stored."""


@dataclass(frozen=True)
class RaftRecipe:
    """The parameters of a snapshot, stored on it (``TrainingDataset.recipe``).

    ``sources_per_prompt``: numbered sources per prompt (default ``LLM_PROMPT_SOURCES``, as served);
    ``gold_share``: probability 0..1 that an example keeps its gold chunks (RAFT's P; the paper's
    best is 0.8 for most data sets); ``holdout_share``: share 0..1 of correction groups held out;
    ``seed``: seeds the gold/no-gold draw and the source order; ``source_max_chars``: excerpt length
    per source (``LLM_SOURCE_MAX_CHARS``); ``abstain_answer``: the target without gold;
    ``max_train_examples``: keep only the first N training examples (oldest corrections first;
    ``None`` keeps all; the held-out split is unaffected), for learning curves.
    """

    method: str = "raft"
    sources_per_prompt: int = 3
    gold_share: float = 1.0
    holdout_share: float = 0.2
    seed: int = 0
    source_max_chars: int = 600
    abstain_answer: str = ABSTAIN_MESSAGE
    max_train_examples: int | None = None

    @classmethod
    def from_settings(cls, **overrides) -> "RaftRecipe":
        """The recipe from settings (``TUNING_*``, ``LLM_PROMPT_SOURCES``, ``LLM_SOURCE_MAX_CHARS``)."""
        values = {
            "sources_per_prompt": settings.LLM_PROMPT_SOURCES,
            "gold_share": settings.TUNING_GOLD_SHARE,
            "holdout_share": settings.TUNING_HOLDOUT_SHARE,
            "seed": settings.TUNING_SEED,
            "source_max_chars": settings.LLM_SOURCE_MAX_CHARS,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def correction_group(correction: Correction) -> str:
    """The unit the held-out split keeps together: the seeded question's dialogue, else the
    conversation of the corrected message."""
    if correction.seeded and correction.seed_group:
        return f"seed:{correction.seed_group}"
    return f"conversation:{correction.message.conversation_id}" if correction.message_id else f"correction:{correction.pk}"


def correction_split(correction: Correction, holdout_share: float) -> str:
    """``"heldout"`` or ``"train"``: held out when the SHA-256 of the correction's group, read as a
    number in [0, 1), is below ``holdout_share`` (a fixed function, so stable across snapshots)."""
    digest = hashlib.sha256(correction_group(correction).encode()).hexdigest()
    return TrainingExample.Split.HELDOUT if int(digest[:12], 16) / 16**12 < holdout_share else TrainingExample.Split.TRAIN


def _with_marker(sentence: str, marks: str) -> str:
    """``sentence`` with ``marks`` (``"[2]"``) before its final punctuation (``"Yes [2]."``)."""
    if sentence.endswith((".", "!", "?")):
        return f"{sentence[:-1]} {marks}{sentence[-1]}"
    return f"{sentence} {marks}"


def place_markers(text: str, gold: list[tuple[int, str]], *, min_coverage: float = 0.5) -> str:
    """``text`` (no markers) with the gold sources' markers placed where their evidence is.

    ``gold`` is ``[(number, chunk_text)]``. Each sentence is marked with the gold source covering
    the largest share of its content-word stems (``chat.grounding.stems``) when that share is at least
    ``min_coverage``; when no sentence reaches it, the sentence sharing the most stems with any gold
    source gets every gold number (a target always cites its evidence once). Returns ``text``
    unchanged when ``gold`` is empty.
    """
    from chat.grounding import split_sentences, stems

    sentences = split_sentences(text)
    if not gold or not sentences:
        return text
    gold_stems = [(number, set(stems(chunk_text))) for number, chunk_text in gold]
    marked, best = [], (0, -1)
    for index, sentence in enumerate(sentences):
        words = set(stems(sentence))
        overlaps = [(len(words & g) / len(words) if words else 0.0, len(words & g), number) for number, g in gold_stems]
        coverage, shared, number = max(overlaps)
        best = max(best, (shared, index))
        marked.append(_with_marker(sentence, f"[{number}]") if coverage >= min_coverage else sentence)
    if all(m == s for m, s in zip(marked, sentences)):
        index = best[1] if best[0] > 0 else len(sentences) - 1
        marked[index] = _with_marker(sentences[index], "".join(f"[{n}]" for n, _ in gold))
    return " ".join(marked)


def _renumber(answer: str, old_ids: list[int], new_ids: list[int], gold: list[dict]) -> str:
    """``answer`` with ``[n]`` (n into ``old_ids``) rewritten to positions in ``new_ids``; markers
    naming chunks not in ``new_ids`` dropped; when none remain, the gold sources' markers placed
    after the sentences their text supports (``place_markers``)."""
    position = {chunk_id: n for n, chunk_id in enumerate(new_ids, start=1)}

    def replace(match: re.Match) -> str:
        kept = [position[old_ids[n - 1]] for n in marker_numbers(match.group(1))
                if 1 <= n <= len(old_ids) and old_ids[n - 1] in position]
        return "".join(f"[{n}]" for n in dict.fromkeys(kept))

    text = " ".join(MARKER.sub(replace, answer).split())
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    if not MARKER.search(text):
        text = place_markers(text, [(position[g["chunk_id"]], g.get("text", "")) for g in gold
                                    if g["chunk_id"] in position])
    return text


def raft_example(correction: Correction, recipe: RaftRecipe, *, heldout: bool = False) -> dict:
    """One example for ``correction``: ``{"record": {"messages", "metadata"}, "has_gold": bool,
    "gold_numbers": [int]}`` (see the module docstring). ``heldout`` examples always keep their gold.
    Deterministic for a given correction id and ``recipe.seed``."""
    rng = random.Random(f"{recipe.seed}:{correction.pk}")
    gold = list({s["chunk_id"]: s for s in correction.supporting_chunks}.values())
    gold_ids = [s["chunk_id"] for s in gold]
    distractors = [s for s in correction.shown_chunks if s["chunk_id"] not in gold_ids]
    keep_gold = heldout or not gold or rng.random() < recipe.gold_share or not distractors
    if gold and keep_gold:
        sources = gold[: recipe.sources_per_prompt]
        sources += distractors[: recipe.sources_per_prompt - len(sources)]
    else:
        sources = distractors[: recipe.sources_per_prompt]
    rng.shuffle(sources)
    new_ids = [s["chunk_id"] for s in sources]
    old_ids = [s["chunk_id"] for s in correction_sources(correction)]
    has_gold = bool(gold) and keep_gold
    if has_gold:
        answer = _renumber(correction.corrected_answer, old_ids, new_ids, gold)
    elif gold:  # gold left out on purpose: the sources do not hold the answer
        answer = recipe.abstain_answer
    else:  # the agent's answer needs no source (e.g. "should have handed off"): kept as written
        answer = " ".join(MARKER.sub("", correction.corrected_answer).split())
    question = correction.question or correction.original_answer
    prompt = grounded_messages(question, [_as_retrieved(s) for s in sources], max_chars=recipe.source_max_chars)
    gold_numbers = [n for n, chunk_id in enumerate(new_ids, start=1) if chunk_id in gold_ids] if has_gold else []
    record = {
        "messages": [*prompt, {"role": "assistant", "content": answer}],
        "metadata": {
            "correction_id": correction.pk, "reason": correction.reason, "seeded": correction.seeded,
            "question": question, "reference_answer": correction.corrected_answer,
            "chunk_ids": new_ids, "gold_chunk_ids": gold_ids, "has_gold": has_gold,
            "history": correction.history,
            "collection": correction.message.conversation.collection if correction.message_id else "default",
        },
    }
    return {"record": record, "has_gold": has_gold, "gold_numbers": gold_numbers}


def approved_corrections():
    """Approved, non-stale corrections, oldest first (after re-checking staleness)."""
    corrections_flag_stale()
    return (Correction.objects.filter(status=Correction.Status.APPROVED, stale=False)
            .select_related("message__conversation").order_by("created_at", "id"))


def dataset_snapshot_create(recipe: RaftRecipe | None = None) -> TrainingDataset:
    """Build and store a new immutable snapshot (next ``version``) from every approved, non-stale
    correction with ``recipe`` (default ``RaftRecipe.from_settings()``).

    Raises ``DatasetError`` when there is no approved correction, or none left for training.
    """
    recipe = recipe or RaftRecipe.from_settings()
    corrections = list(approved_corrections())
    if not corrections:
        raise DatasetError("no approved corrections: approve some in the dashboard or run seed_training_data")
    built = []
    for correction in corrections:
        split = correction_split(correction, recipe.holdout_share)
        built.append((correction, split, raft_example(correction, recipe, heldout=split == TrainingExample.Split.HELDOUT)))
    if recipe.max_train_examples is not None:
        kept = {id(b) for b in [b for b in built if b[1] == TrainingExample.Split.TRAIN][: recipe.max_train_examples]}
        built = [b for b in built if b[1] != TrainingExample.Split.TRAIN or id(b) in kept]
    train = [b for b in built if b[1] == TrainingExample.Split.TRAIN]
    if not train:
        raise DatasetError(f"all {len(built)} approved corrections fall in the held-out share; approve more")
    digest = hashlib.sha256()
    for _, split, example in built:
        digest.update(json.dumps([split, example["record"]], sort_keys=True, ensure_ascii=False).encode())
    with transaction.atomic():
        # Serialise version numbers (two snapshots at once get distinct versions).
        TrainingDataset.objects.select_for_update().all().exists()
        version = (TrainingDataset.objects.aggregate(v=Max("version"))["v"] or 0) + 1
        dataset = TrainingDataset.objects.create(
            version=version, recipe=asdict(recipe), sha256=digest.hexdigest(),
            train_count=len(train), heldout_count=len(built) - len(train), corrections_count=len(built),
        )
        TrainingExample.objects.bulk_create([
            TrainingExample(dataset=dataset, correction=correction, split=split, has_gold=example["has_gold"],
                            gold_numbers=example["gold_numbers"], record=example["record"])
            for correction, split, example in built
        ])
    return dataset


def dataset_records(dataset: TrainingDataset, split: str = TrainingExample.Split.TRAIN) -> list[dict]:
    """The chat records of ``dataset``'s ``split`` (``"train"`` or ``"heldout"``), in stored order."""
    return [e.record for e in dataset.examples.filter(split=split).order_by("id")]


def new_approved_since(dataset: TrainingDataset | None) -> int:
    """Approved, non-stale corrections created or approved after ``dataset`` was made (all of them
    when ``dataset`` is ``None``): what the scheduled fine-tune counts before starting a run."""
    corrections = Correction.objects.filter(status=Correction.Status.APPROVED, stale=False)
    if dataset is None:
        return corrections.count()
    included = dataset.examples.values_list("correction_id", flat=True)
    return corrections.exclude(pk__in=included).count()
