"""LoRA fine-tuning of the base GGUF model with transformers + peft (the ML core of a fine-tune run).

Plain Python, no Django: the fine-tune run (``tuning.fine_tuning``, run by a Celery task) calls
these with paths and records and stores the results. Runs in worker processes only; serving never imports this module.

- ``load_base_model``: transformers loads the GGUF and dequantizes its weights to float32 (its GGUF
  loader also undoes llama.cpp's rotary row permutation of the q and k projections).
- ``encode_chat_record``: a chat record in the model's own chat template, with the loss masked to the
  final assistant turn (supervised fine-tuning on completions only, as in RAFT: Zhang et al., 2024,
  "RAFT: Adapting Language Model to Domain Specific RAG", where the system or user turn holds the gold
  and distractor sources and the assistant turn is the answer to learn).
- ``lora_train``: a plain torch training loop over peft's LoRA (Hu et al., 2021, "LoRA: Low-Rank
  Adaptation of Large Language Models"; ``peft.get_peft_model`` + ``peft.LoraConfig``), deterministic
  for a given seed on a given machine.

Records are ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose
last message is the assistant answer to learn.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

# Loss positions that are not trained on (torch.nn.functional.cross_entropy's ignore_index).
IGNORE_INDEX = -100

# Hugging Face module names of a llama-style decoder block (also the names peft targets).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class TrainingStopped(Exception):
    """``should_stop()`` returned true: training was aborted after ``steps_done`` optimizer steps."""

    def __init__(self, steps_done: int, total_steps: int):
        super().__init__(f"training stopped after {steps_done} of {total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps


@dataclass(frozen=True)
class LoraHyperparameters:
    """LoRA fine-tune settings. The defaults are starting points for SmolLM2-135M-Instruct on a few
    hundred RAFT examples (common LoRA values; measured only on short runs, see below).

    - ``r``: LoRA rank; ``alpha``: LoRA alpha (the update is scaled by ``alpha / r``, peft's and
      llama.cpp's convention); ``dropout``: dropout on the LoRA input (peft's ``lora_dropout``).
    - ``target_modules``: Hugging Face projection names to adapt; by default every linear projection
      of the decoder blocks (``ATTENTION_PROJECTIONS + MLP_PROJECTIONS``, as QLoRA recommends:
      Dettmers et al., 2023). Measured on SmolLM2-135M, 8 Doc2Dial examples x 3 epochs at learning
      rate 1e-3 (``benchmarks/fine_tune_parity.py``): answer log-likelihood in llama.cpp on 8
      held-out questions -1.515 (base) -> -0.630 nats/token with attention only, -0.474 with the MLP
      too, for 2.8 instead of 2.0 s per example pass, 2.4 instead of 2.0 GB peak RSS and a 19.6
      instead of 7.4 MB adapter. Never ``lm_head`` or ``embed_tokens``: the base ties them, and
      llama.cpp's converter refuses an adapter on a tied output layer.
    - ``learning_rate``: AdamW peak learning rate, linear warm-up over ``warmup_ratio`` of the steps,
      then linear decay to 0; ``weight_decay``: AdamW weight decay; ``max_grad_norm``: gradient
      clipping (L2 norm).
    - ``epochs``: passes over the records; ``batch_size``: records per optimizer step;
      ``micro_batch_size``: records per forward/backward pass (gradients accumulate over the
      micro-batches of a step). 1 (the default) pads nothing and keeps activation memory to one
      sequence: measured on SmolLM2-135M on CPU, a 4 x 300-token batch in one pass peaks at ~3.8 GB
      RSS against ~1.7 GB for one sequence, for no speed gain; raise it on a GPU.
    - ``max_seq_tokens``: longest training sequence in tokens (prompt + answer); longer records keep
      their answer and lose the start of their prompt (see ``encode_chat_record``).
    - ``seed``: seeds LoRA initialisation, dropout and the shuffling order.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: int = 2
    batch_size: int = 4
    micro_batch_size: int = 1
    max_seq_tokens: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.r < 1 or self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1 or self.max_seq_tokens < 2:
            raise ValueError(f"invalid hyper-parameters: {self}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        forbidden = {"lm_head", "embed_tokens"} & set(self.target_modules)
        if forbidden:
            raise ValueError(f"target_modules must not include {sorted(forbidden)} (tied in the base)")
        # Lists (from JSON settings) become tuples, so the dataclass stays hashable and comparable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``target_modules`` as a list), e.g. to record on a run."""
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values


@dataclass
class EncodedRecord:
    """One chat record as token ids.

    ``input_ids``: prompt + answer token ids (``len <= max_tokens``); ``labels``: same length,
    ``IGNORE_INDEX`` on prompt positions and the answer's token ids on answer positions;
    ``prompt_tokens`` / ``answer_tokens``: lengths of the two parts; ``truncated``: the record was
    cut to fit ``max_tokens``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    answer_tokens: int
    truncated: bool


@dataclass
class TrainResult:
    """Outcome of ``lora_train``.

    - ``peft_model``: the base model with LoRA layers (``peft.PeftModel``, eval mode).
    - ``loss_curve``: one ``{"step": int (1-based), "epoch": float (fractional, 1.0 = end of the
      first epoch), "loss": float (mean cross-entropy in nats per answer token of that step's
      batch)}`` per optimizer step.
    - ``duration_s``: wall-clock training time (``time.perf_counter``), excluding model loading.
    - ``examples``: records in the data set; ``tokens``: tokens of the encoded data set (prompt +
      answer, one epoch); ``answer_tokens``: supervised tokens of one epoch; ``truncated``: records
      cut to ``max_seq_tokens``; ``steps``: optimizer steps run; ``epochs``: passes made.
    """

    peft_model: Any
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    duration_s: float = 0.0
    examples: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    truncated: int = 0
    steps: int = 0
    epochs: int = 0

    @property
    def seconds_per_example(self) -> float:
        """Training time per example pass (``duration_s / (examples * epochs)``), in seconds."""
        passes = self.examples * self.epochs
        return self.duration_s / passes if passes else 0.0


def default_device() -> str:
    """``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def gguf_chat_template(gguf_path: str | Path) -> str | None:
    """The ``tokenizer.chat_template`` KV field of a GGUF file (read with ``gguf.GGUFReader``), or
    ``None`` when absent. Raises ``FileNotFoundError`` when the file does not exist."""
    import gguf

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"not a GGUF file: {path}")
    field_ = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
    return field_.contents() if field_ is not None else None


def load_base_tokenizer(gguf_path: str | Path):
    """The tokenizer stored in a GGUF file (``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)``), with the GGUF's chat template.

    transformers' GGUF tokenizer loader normally carries ``tokenizer.chat_template`` over; when it
    does not, the template is read from the GGUF metadata. Raises ``FileNotFoundError`` when the file
    does not exist and ``ValueError`` when the GGUF has no chat template (records could not be
    formatted as the served model sees them).
    """
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"not a GGUF file: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        template = gguf_chat_template(path)
        if not template:
            raise ValueError(f"{path} has no tokenizer.chat_template")
        tokenizer.chat_template = template
    return tokenizer


def load_base_model(gguf_path: str | Path, *, device: str | None = None):
    """Load a base GGUF into transformers for training: returns ``(model, tokenizer)``.

    The model is ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)``
    (quantised weights dequantized to float32; the q/k rotary permutation of llama GGUF files
    undone), in eval mode on ``device`` (default ``default_device()``: the GPU when present). The
    tokenizer is ``load_base_tokenizer(gguf_path)``. SmolLM2-135M Q4_1 takes ~20 s and ~1.2 GB RSS
    on 2 CPU cores, most of it parsing the GGUF's 49,152-token vocabulary.

    Raises ``FileNotFoundError`` when the file does not exist, ``ValueError`` when it has no chat
    template; transformers raises for architectures its GGUF loader does not support.
    """
    from transformers import AutoModelForCausalLM

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"not a GGUF file: {path}")
    tokenizer = load_base_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


def _template_text(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_chat_record(tokenizer, record: dict, *, max_tokens: int) -> EncodedRecord:
    """Tokenize ``record`` (``{"messages": [...]}``, last message from the assistant) with the
    model's chat template and mask everything but the final assistant turn.

    The prompt is the template applied to all messages but the last with the generation prompt
    (``<|im_start|>assistant\\n`` for ChatML), exactly what the served model sees before it answers;
    the answer is the rest of the templated conversation up to and including the end-of-turn token
    (the tokenizer's ``eos_token``), so the model also learns to stop. Prompt and answer are
    tokenized separately (no special tokens added; the template writes them), so the boundary is
    exact. When prompt + answer exceed ``max_tokens``, the answer stays whole unless it is longer
    than both what the prompt leaves and half the budget (then it is cut at its end to the larger of
    the two), and the prompt loses tokens from its start to fill the rest.

    Raises ``ValueError`` when the record has no messages, the last one is not from the assistant,
    or the template does not render the prompt as a prefix of the conversation.
    """
    messages = record.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training record's last message must be the assistant's answer")
    full_text = _template_text(tokenizer, messages, add_generation_prompt=False)
    prompt_text = _template_text(tokenizer, messages[:-1], add_generation_prompt=True)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    answer_text = full_text[len(prompt_text):]
    eos = tokenizer.eos_token
    if eos and eos in answer_text:
        answer_text = answer_text[: answer_text.rindex(eos) + len(eos)]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    truncated = len(prompt_ids) + len(answer_ids) > max_tokens
    if truncated:
        answer_ids = answer_ids[: max(max_tokens - len(prompt_ids), max_tokens - max_tokens // 2)]
        prompt_budget = max_tokens - len(answer_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_budget:] if prompt_budget else []
    return EncodedRecord(
        input_ids=list(prompt_ids) + list(answer_ids),
        labels=[IGNORE_INDEX] * len(prompt_ids) + list(answer_ids),
        prompt_tokens=len(prompt_ids),
        answer_tokens=len(answer_ids),
        truncated=truncated,
    )


def _collate(batch: Sequence[EncodedRecord], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors of shape
    ``[len(batch), longest]``."""
    longest = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item.labels)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def answer_loss(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy (nats) over positions whose label is not ``IGNORE_INDEX``; tensors
    of shape ``[batch, seq]``. ``reduction``: ``"mean"`` (per supervised token) or ``"sum"``.

    Only the hidden states that predict a supervised token go through the output layer (the
    decoder's last hidden state, then ``get_output_embeddings()``), so memory does not grow with
    ``batch * seq * vocab`` (49,152 for SmolLM2). ``model`` is a causal LM or a peft model over one.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def _supervised_positions(item: EncodedRecord) -> int:
    """Answer tokens that some position predicts (the first token has no predecessor when the
    prompt is empty)."""
    return sum(1 for label in item.labels[1:] if label != IGNORE_INDEX)


def lora_train(
    model,
    tokenizer,
    records: Sequence[dict],
    hyperparameters: LoraHyperparameters | None = None,
    *,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``records`` and return it with its loss curve.

    ``model`` / ``tokenizer`` come from ``load_base_model``; the model is wrapped in place with
    ``peft.get_peft_model(model, LoraConfig(...))`` (so do not reuse it as a plain base model
    afterwards: use ``peft_model.disable_adapter()``). Each record is encoded with
    ``encode_chat_record`` (loss on the final assistant turn only). Training is a plain torch loop:
    per epoch the records are shuffled with a generator seeded by ``seed + epoch``, batched
    (``batch_size`` records per step, run ``micro_batch_size`` at a time, right-padded, gradients
    accumulated), and each batch takes one AdamW step on the LoRA parameters
    (base weights, ``lm_head`` and ``embed_tokens`` frozen) with gradient clipping and a linear
    warm-up/decay schedule. Same seed, records, hyper-parameters and machine give the same loss curve.

    ``on_progress(step, total_steps, loss)`` is called after every optimizer step (1-based ``step``;
    ``loss`` in nats per answer token). ``should_stop()`` is called before every step; when it
    returns true, ``TrainingStopped`` is raised (the model then holds a partly trained adapter).

    Raises ``ValueError`` for an empty ``records`` or a malformed record (see
    ``encode_chat_record``), ``TrainingStopped`` as above.
    """
    from peft import LoraConfig, get_peft_model

    hp = hyperparameters or LoraHyperparameters()
    if not records:
        raise ValueError("no training records")
    encoded = [encode_chat_record(tokenizer, record, max_tokens=hp.max_seq_tokens) for record in records]
    if not any(item.answer_tokens for item in encoded):
        raise ValueError("no answer tokens to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    torch.manual_seed(hp.seed)
    config = LoraConfig(
        r=hp.r,
        lora_alpha=hp.alpha,
        lora_dropout=hp.dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    warmup = max(1, round(hp.warmup_ratio * total_steps)) if hp.warmup_ratio > 0 else 0

    def lr_factor(step: int) -> float:  # step: 0-based index of the optimizer step about to run
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_curve: list[dict[str, float]] = []
    step = 0
    started = time.perf_counter()
    peft_model.train()
    try:
        for epoch in range(hp.epochs):
            order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(hp.seed + epoch)).tolist()
            for start in range(0, len(order), hp.batch_size):
                if should_stop is not None and should_stop():
                    raise TrainingStopped(step, total_steps)
                batch = [encoded[index] for index in order[start:start + hp.batch_size]]
                # Gradient accumulation over micro-batches, weighted by supervised tokens, equals one
                # pass over the whole batch with a per-token mean loss, without its padding.
                batch_positions = max(1, sum(_supervised_positions(item) for item in batch))
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(0, len(batch), hp.micro_batch_size):
                    input_ids, attention_mask, labels = _collate(batch[micro:micro + hp.micro_batch_size], pad_id, device)
                    loss = answer_loss(peft_model, input_ids, attention_mask, labels, reduction="sum") / batch_positions
                    loss.backward()
                    total += float(loss.detach())
                if hp.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_curve.append({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": total})
                if on_progress is not None:
                    on_progress(step, total_steps, total)
    finally:
        peft_model.eval()
    return TrainResult(
        peft_model=peft_model,
        loss_curve=loss_curve,
        duration_s=time.perf_counter() - started,
        examples=len(encoded),
        tokens=sum(len(item.input_ids) for item in encoded),
        answer_tokens=sum(item.answer_tokens for item in encoded),
        truncated=sum(item.truncated for item in encoded),
        steps=step,
        epochs=hp.epochs,
    )
