"""Fine-tuning the sentence-embedding model on approved corrections (the ML core of a retriever run).

Every approved correction says which chunks answer its question (``supporting_chunks``, picked by
the agent) and which chunks retrieval really returned for it (``shown_chunks``). That is a retrieval
training example: the anchor is the question as retrieval reads it (``knowledge.selectors.
retrieval_query``: the question, then the earlier user turns), the positive is a supporting chunk as
it is embedded (``knowledge.embedding.passage_text``: title and headings, then the passage), and the
hard negative is the highest-ranked shown chunk the agent did not pick (and that does not overlap a
picked one). Curated answers (sources of kind ``curated``: earlier approved corrections, which
retrieval shows beside the passages) are neither: they are not passages, they are matched by their
question (``CURATED_MATCH_MAX_DISTANCE``), and a curated answer to the same question as a negative
would teach the model to push a question away from its own answer (on seeded Doc2Dial, 750 of the
1,524 training examples had one as their hard negative).

The loss is sentence-transformers' ``MultipleNegativesRankingLoss`` (Henderson et al., 2017,
"Efficient Natural Language Response Suggestion for Smart Reply", arXiv:1705.00652; as used to train
the all-MiniLM models): a softmax over the anchor's similarity to its positive, to every other
positive and hard negative of the batch (in-batch negatives), so larger batches give more negatives.
Batches never hold the same positive chunk twice (a duplicate would be a false negative), as
sentence-transformers' ``NoDuplicatesBatchSampler`` does.

- ``embedder_examples`` (Django): the examples of corrections, split by ``tuning.datasets.
  correction_split`` (the LoRA datasets' split: by conversation, or by dialogue for seeded
  corrections), so a held-out correction is never trained on.
- ``embedder_train`` (plain torch, no Django): a plain training loop (AdamW, linear warm-up then
  linear decay, gradient clipping), deterministic for a given seed on a given machine; saves the
  model with ``SentenceTransformer.save`` and returns the loss curve.

Runs in worker processes and benchmarks only; serving never imports this module.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence


@dataclass(frozen=True)
class EmbedderExample:
    """One training example: ``anchor`` (the retrieval query text), ``positive`` (the embedded text
    of a supporting chunk), ``negative`` (the embedded text of a hard negative, ``""`` when retrieval
    showed none), the ids of both chunks (``negative_chunk_id`` ``None`` without one), the
    correction's id, its ``group`` (conversation or dialogue) and the positive chunk's source id."""

    anchor: str
    positive: str
    negative: str
    positive_chunk_id: int
    negative_chunk_id: int | None
    correction_id: int
    group: str
    positive_source_id: int | None = None

    def record(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in snapshots and hashed)."""
        return asdict(self)


@dataclass(frozen=True)
class EmbedderHyperparameters:
    """Embedder fine-tune settings.

    - ``learning_rate``: AdamW peak learning rate (sentence-transformers' default 2e-5), linear
      warm-up over ``warmup_ratio`` of the steps, then linear decay to 0; ``weight_decay``;
      ``max_grad_norm``: gradient clipping (L2 norm).
    - ``epochs``: passes over the examples; ``batch_size``: examples per step (each brings its
      positive and hard negative as in-batch negatives of the others).
    - ``scale``: MNRL's similarity scale (inverse temperature; sentence-transformers' default 20).
    - ``max_seq_length``: longest input in word-piece tokens (longer texts are cut).
    - ``hard_negatives``: use the shown-but-not-picked chunks (else in-batch negatives only).
    - ``mini_batch_size``: 0 trains with ``MultipleNegativesRankingLoss``, whose memory grows with
      ``batch_size`` x ``max_seq_length``; N > 0 with ``CachedMultipleNegativesRankingLoss`` (GradCache,
      Gao et al., 2021, arXiv:2101.06983): the same loss and gradients, the texts embedded N at a time
      twice (once without gradients), so memory follows N (batch 32 of 256-token texts on Doc2Dial:
      11.1 GB peak RSS plain, 2.75 GB at N = 8, for 1.25x the training time).
    - ``seed``: seeds the shuffling order and dropout.
    """

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    batch_size: int = 32
    scale: float = 20.0
    max_seq_length: int = 256
    hard_negatives: bool = True
    mini_batch_size: int = 0
    seed: int = 0

    def __post_init__(self):
        if (self.epochs < 1 or self.batch_size < 2 or self.max_seq_length < 8 or self.learning_rate <= 0
                or self.mini_batch_size < 0):
            raise ValueError(f"invalid hyper-parameters: {self}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, e.g. to record on a run."""
        return asdict(self)


@dataclass
class EmbedderTrainResult:
    """Outcome of ``embedder_train``: ``output_dir`` (the saved sentence-transformers folder),
    ``loss_curve`` (``[{"step": int (1-based), "epoch": float, "loss": float (MNRL, nats)}]``),
    ``duration_s`` (wall-clock training time without loading or saving), ``examples``, ``steps``,
    ``dimension`` (of the saved model's vectors)."""

    output_dir: str
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    duration_s: float = 0.0
    examples: int = 0
    steps: int = 0
    dimension: int = 0


def _overlaps(chunk: dict, picked: Sequence[dict]) -> bool:
    return any(
        chunk.get("source_id") == p.get("source_id") and chunk.get("start", 0) < p.get("end", 0)
        and chunk.get("end", 0) > p.get("start", 0)
        for p in picked
    )


def is_curated(chunk: dict, curated_source_ids: Collection[int] = ()) -> bool:
    """Whether a chunk snapshot (``tuning.services.chunk_snapshot``) is a curated answer: its
    ``source_kind`` says so, or (snapshots taken before the kind was recorded) its ``source_id`` is
    in ``curated_source_ids``."""
    return chunk.get("source_kind") == "curated" or chunk.get("source_id") in curated_source_ids


def correction_examples(correction, group: str, curated_source_ids: Collection[int] = ()) -> list[EmbedderExample]:
    """The examples of one correction (``tuning.models.Correction`` or anything with ``pk``,
    ``question``, ``history``, ``shown_chunks``, ``supporting_chunks``): one per supporting chunk,
    each with the best-ranked shown chunk that is not picked and overlaps no picked chunk as its hard
    negative. Curated answers (``is_curated`` with ``curated_source_ids``) are skipped as positives
    and as negatives. ``[]`` for a correction without supporting passages (nothing to learn: an
    abstention)."""
    from knowledge.embedding import passage_text
    from knowledge.selectors import retrieval_query

    picked = [c for c in correction.supporting_chunks or []
              if c.get("text") and not is_curated(c, curated_source_ids)]
    if not picked:
        return []
    anchor = retrieval_query(correction.question, correction.history or [])
    picked_ids = {c.get("chunk_id") for c in picked}
    negatives = [
        c for c in correction.shown_chunks or []
        if c.get("text") and c.get("chunk_id") not in picked_ids and not _overlaps(c, picked)
        and not is_curated(c, curated_source_ids)
    ]
    negative = negatives[0] if negatives else None

    def embedded(chunk: dict) -> str:
        return passage_text(chunk.get("source_title", ""), chunk.get("heading_path") or [], chunk["text"])

    return [
        EmbedderExample(
            anchor=anchor, positive=embedded(chunk), negative=embedded(negative) if negative else "",
            positive_chunk_id=int(chunk.get("chunk_id") or 0),
            negative_chunk_id=int(negative["chunk_id"]) if negative and negative.get("chunk_id") else None,
            correction_id=correction.pk, group=group, positive_source_id=chunk.get("source_id"),
        )
        for chunk in picked
    ]


def embedder_examples(corrections: Iterable, *, holdout_share: float) -> dict[str, list[EmbedderExample]]:
    """``{"train": [...], "heldout": [...]}``: the examples of ``corrections`` (approved, non-stale
    ``Correction`` rows; the caller filters), split by ``tuning.datasets.correction_split`` with
    ``holdout_share`` (0..1), in the corrections' order."""
    from knowledge.models import Source
    from tuning.datasets import correction_group, correction_split

    corrections = list(corrections)
    source_ids = {chunk.get("source_id") for correction in corrections
                  for chunk in [*(correction.supporting_chunks or []), *(correction.shown_chunks or [])]}
    curated = set(Source.objects.filter(pk__in=[i for i in source_ids if i is not None],
                                        kind=Source.Kind.CURATED).values_list("pk", flat=True))
    split: dict[str, list[EmbedderExample]] = {"train": [], "heldout": []}
    for correction in corrections:
        split[correction_split(correction, holdout_share)].extend(
            correction_examples(correction, correction_group(correction), curated)
        )
    return split


def examples_sha256(examples: Sequence[EmbedderExample]) -> str:
    """SHA-256 of the examples' records in order (recognises two identical training sets)."""
    import json

    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.record(), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def batches_without_duplicates(
    examples: Sequence[EmbedderExample], batch_size: int, rng: random.Random
) -> list[list[EmbedderExample]]:
    """Shuffle ``examples`` and cut them into batches of at most ``batch_size`` where no chunk is the
    positive of two examples, no example's positive is another's hard negative, and no anchor appears
    twice (a correction with two picked chunks gives two examples with one anchor): each would be a
    false in-batch negative. Two examples may share a hard negative (it is wrong for both). Examples
    with and without a hard negative never share a batch, so every batch of examples that have one
    trains on them (the loss takes a hard-negative column only when the whole batch fills it). An
    example that fits no open batch starts a new one; every example is used exactly once; the
    batches come in a shuffled order."""
    order = list(examples)
    rng.shuffle(order)
    batches: list[tuple[list[EmbedderExample], set, set]] = []  # (examples, positives + anchors, negatives)
    for example in order:
        positives = {("chunk", example.positive_chunk_id), ("text", example.positive), ("anchor", example.anchor)}
        negatives = {("chunk", example.negative_chunk_id), ("text", example.negative)} if example.negative else set()
        for batch, used_positives, used_negatives in batches:
            if (len(batch) < batch_size and bool(batch[0].negative) == bool(example.negative)
                    and not positives & used_positives and not positives & used_negatives
                    and not negatives & used_positives):
                batch.append(example)
                used_positives.update(positives)
                used_negatives.update(negatives)
                break
        else:
            batches.append(([example], set(positives), set(negatives)))
    cut = [batch for batch, _, _ in batches]
    rng.shuffle(cut)
    return cut


def embedder_train(
    model_path: str | Path,
    examples: Sequence[EmbedderExample],
    output_dir: str | Path,
    hyperparameters: EmbedderHyperparameters = EmbedderHyperparameters(),
    *,
    device: str = "cpu",
    on_step: Callable[[dict[str, float], int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EmbedderTrainResult:
    """Fine-tune the sentence-transformers model at ``model_path`` on ``examples`` with
    ``MultipleNegativesRankingLoss`` and save it to ``output_dir`` (created).

    ``on_step(point, total_steps)`` is called after each optimizer step with its loss-curve point;
    ``should_stop()`` is checked before each step (raises ``tuning.training.TrainingStopped`` when
    true, nothing saved). Raises ``ValueError`` for fewer than 2 examples (MNRL needs in-batch
    negatives) and whatever sentence-transformers raises for an unreadable model folder. Torch's
    thread count is the caller's (``torch.set_num_threads``).
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)

    from tuning.training import TrainingStopped

    if len(examples) < 2:
        raise ValueError(f"need at least 2 training examples, got {len(examples)}")
    hp = hyperparameters
    torch.manual_seed(hp.seed)
    rng = random.Random(hp.seed)
    model = SentenceTransformer(str(model_path), device=device)
    model.max_seq_length = min(hp.max_seq_length, model.max_seq_length or hp.max_seq_length)
    if hp.mini_batch_size:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=hp.scale, mini_batch_size=hp.mini_batch_size)
    else:
        loss_fn = MultipleNegativesRankingLoss(model, scale=hp.scale)
    # A batch of one has no in-batch negative: nothing to learn from it.
    epochs = [[b for b in batches_without_duplicates(examples, hp.batch_size, rng) if len(b) > 1]
              for _ in range(hp.epochs)]
    total = sum(len(batches) for batches in epochs)
    if not total:
        raise ValueError(f"no two of the {len(examples)} examples can share a batch (they all repeat one "
                         "positive chunk or anchor): nothing to contrast")
    decay = [p for n, p in model.named_parameters() if not any(s in n for s in ("bias", "LayerNorm", "norm"))]
    no_decay = [p for n, p in model.named_parameters() if any(s in n for s in ("bias", "LayerNorm", "norm"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
    )
    warmup = max(1, math.ceil(total * hp.warmup_ratio)) if hp.warmup_ratio > 0 else 0

    def factor(step: int) -> float:  # step counts from 0
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    result = EmbedderTrainResult(output_dir=str(output_dir), examples=len(examples))
    started = time.perf_counter()
    model.train()
    step = 0
    for epoch, batches in enumerate(epochs):
        for index, batch in enumerate(batches):
            if should_stop and should_stop():
                raise TrainingStopped(step, total)
            columns = [[e.anchor for e in batch], [e.positive for e in batch]]
            if hp.hard_negatives and all(e.negative for e in batch):
                columns.append([e.negative for e in batch])
            features = []
            for texts in columns:
                tokens = model.preprocess(texts)
                features.append({key: value.to(device) if isinstance(value, torch.Tensor) else value
                                 for key, value in tokens.items()})
            loss = loss_fn(features, labels=None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            point = {"step": step, "epoch": round(epoch + (index + 1) / len(batches), 4), "loss": round(float(loss.detach()), 5)}
            result.loss_curve.append(point)
            if on_step:
                on_step(point, total)
    result.duration_s = time.perf_counter() - started
    result.steps = step
    model.eval()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    model.save(str(output_dir))
    result.dimension = int(model.get_embedding_dimension())
    return result
