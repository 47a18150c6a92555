"""Parity check of an exported GGUF LoRA adapter: does llama.cpp (the serving runtime) compute what
peft trained?

An adapter written with the wrong tensor names, orientation, scale or rotary permutation can still
load in llama.cpp and still change the output ("looks trained"), so the check compares next-token
distributions, position by position, between the two runtimes:

- reference: base GGUF in llama-cpp-python vs the same base in transformers (dequantized float32),
  which is how closely the two runtimes can agree at all (llama.cpp multiplies quantised weights
  with 8-bit-quantised activations; transformers multiplies dequantized float32 weights);
- candidate: base + adapter GGUF in llama-cpp-python vs transformers + peft.

Every position of each prompt record is compared (the prompt's tokens and the answer's), and the
answer positions are also reported on their own. The candidate passes when it agrees about as well
as the reference does (``ParityThresholds``). Measured on SmolLM2-135M-Instruct Q4_1 after a short
fine-tune on 8 Doc2Dial examples, checked on those 8 records (2,198 positions;
``benchmarks/fine_tune_parity.py``): base runtimes KL 0.0035 nats, top-1 97.3 %; correct adapter
KL 0.0035 / 0.0037, top-1 96.8 / 96.0 % (attention-only / attention + MLP LoRA); the same adapters
exported without the q/k rotary permutation KL 0.0158 / 0.0144, top-1 93.0 / 94.4 %.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tuning.training import EncodedRecord, encode_chat_record

# Positions per float64 log-softmax block (memory: positions x vocabulary x 8 bytes x a few copies;
# 128 x 49,152 x 8 = 50 MB).
_CHUNK_POSITIONS = 128


@dataclass(frozen=True)
class ParityThresholds:
    """When a base + adapter pair counts as matching peft; all relative to the base-vs-base reference
    measured in the same check, so they hold for quantised and float models alike.

    - ``kl_ratio`` and ``kl_epsilon_nats``: the adapter's mean KL divergence over all positions
      (transformers + peft ‖ llama.cpp + adapter, nats per position) must be at most ``kl_ratio *
      base_kl + kl_epsilon_nats``. This is the criterion that catches a broken export. Over all
      positions a correct adapter's KL is the base runtimes' (measured on SmolLM2-135M Q4_1: 1.0-1.06x)
      and one exported without the q/k permutation 4.1-4.5x it (attention-only and attention + MLP
      LoRA), so a ratio of 2 leaves room on both sides. Answer positions alone are a worse reference:
      the adapter makes the trained answers near-certain, where any two runtimes agree (correct
      adapter 0.0006 vs base 0.0020 nats), which hides errors relative to the base (the broken
      attention + MLP adapter: 0.0046). The epsilon (0.001 nats) keeps the bound meaningful when the
      base runtimes agree almost exactly (float32 test models: base KL ~1e-7, a broken adapter ~1 nat).
    - ``top1_margin``: the adapter's top-1 next-token agreement over all positions (0..1) must be at
      least the base's minus this margin. A backstop: measured base 97.3 %, correct adapters 96.0-96.8 %
      (96.1 % on held-out records), broken 93.0-94.4 %.
    - ``loglik_ratio`` and ``loglik_epsilon_nats``: the mean absolute difference between the
      runtimes' log-likelihoods of the answer tokens (nats per token) must be at most
      ``loglik_ratio * base_difference + loglik_epsilon_nats``: the answers the adapter was trained
      on must be scored alike. Measured: base 0.031, correct adapters 0.007, broken 0.023-0.060.
    """

    kl_ratio: float = 2.0
    kl_epsilon_nats: float = 0.001
    top1_margin: float = 0.03
    loglik_ratio: float = 2.0
    loglik_epsilon_nats: float = 0.005


DEFAULT_THRESHOLDS = ParityThresholds()


@dataclass
class RuntimeComparison:
    """llama-cpp-python vs transformers on the same token sequences.

    All positions (every token after the first of each record, prompt and answer):
    ``positions``, ``top1_agreement`` (share 0..1 of positions where both runtimes' most likely next
    token is the same), ``mean_kl_nats`` (mean KL(transformers ‖ llama.cpp) of the next-token
    distributions, nats per position).

    Answer positions only (one per answer token, the distributions that predict it):
    ``answer_positions``, ``answer_top1_agreement``, ``answer_mean_kl_nats``, ``loglik_llama`` /
    ``loglik_torch`` (mean log-likelihood of the answer tokens under each runtime, nats per token,
    <= 0) and ``mean_abs_loglik_diff_nats`` (mean |difference| of the per-token log-likelihoods).
    """

    positions: int = 0
    top1_agreement: float = 0.0
    mean_kl_nats: float = 0.0
    answer_positions: int = 0
    answer_top1_agreement: float = 0.0
    answer_mean_kl_nats: float = 0.0
    loglik_llama: float = 0.0
    loglik_torch: float = 0.0
    mean_abs_loglik_diff_nats: float = 0.0


@dataclass
class ParityReport:
    """Result of ``adapter_parity_check``.

    ``base``: base GGUF in llama-cpp-python vs base in transformers (the reference); ``adapter``:
    base + adapter GGUF in llama-cpp-python vs transformers + peft; ``adapter_shift_kl_nats``: mean
    KL(peft with adapter ‖ peft without) over the answer positions (how much the adapter changes
    the model: near 0 means the check cannot tell a broken export from a correct one, and also that
    a broken one would do little harm); ``passed`` and ``reason`` (empty when passed; every failed
    condition otherwise, "; "-separated); ``prompts``: records compared; ``duration_s``: wall-clock
    time of the check.
    """

    base: RuntimeComparison
    adapter: RuntimeComparison
    adapter_shift_kl_nats: float
    thresholds: ParityThresholds
    passed: bool
    reason: str
    prompts: int
    duration_s: float = 0.0

    def as_dict(self) -> dict:
        """JSON-serialisable form (to store on a fine-tune run)."""
        return asdict(self)


def parity_failures(base: RuntimeComparison, adapter: RuntimeComparison, thresholds: ParityThresholds) -> list[str]:
    """The conditions of ``thresholds`` (see ``ParityThresholds``) that ``adapter`` fails, as
    human-readable reasons; empty when it passes."""
    failures = []
    kl_limit = thresholds.kl_ratio * base.mean_kl_nats + thresholds.kl_epsilon_nats
    if not adapter.mean_kl_nats <= kl_limit:
        failures.append(
            f"adapter KL {adapter.mean_kl_nats:.4f} nats > {kl_limit:.4f} "
            f"({thresholds.kl_ratio:g} x base KL {base.mean_kl_nats:.4f} + {thresholds.kl_epsilon_nats:g})"
        )
    top1_limit = base.top1_agreement - thresholds.top1_margin
    if not adapter.top1_agreement >= top1_limit:
        failures.append(
            f"adapter top-1 agreement {adapter.top1_agreement:.3f} < {top1_limit:.3f} "
            f"(base {base.top1_agreement:.3f} - {thresholds.top1_margin:g})"
        )
    loglik_limit = thresholds.loglik_ratio * base.mean_abs_loglik_diff_nats + thresholds.loglik_epsilon_nats
    if not adapter.mean_abs_loglik_diff_nats <= loglik_limit:
        failures.append(
            f"adapter answer log-likelihood differs by {adapter.mean_abs_loglik_diff_nats:.4f} nats/token "
            f"> {loglik_limit:.4f} ({thresholds.loglik_ratio:g} x base {base.mean_abs_loglik_diff_nats:.4f} "
            f"+ {thresholds.loglik_epsilon_nats:g})"
        )
    return failures


class _Accumulator:
    """Sums of per-position metrics between two runtimes' log-probabilities."""

    def __init__(self):
        self.positions = self.top1 = 0
        self.kl = 0.0
        self.answer_positions = self.answer_top1 = 0
        self.answer_kl = self.loglik_llama = self.loglik_torch = self.abs_diff = 0.0

    def add(self, logp_torch: torch.Tensor, logp_llama: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor) -> None:
        """``logp_*``: float64 log-probabilities ``[positions, vocab]``; ``targets``: the next tokens
        ``[positions]``; ``answer``: bool ``[positions]``, true where the target is an answer token."""
        agree = logp_torch.argmax(-1) == logp_llama.argmax(-1)
        kl = (logp_torch.exp() * (logp_torch - logp_llama)).sum(-1)
        self.positions += targets.numel()
        self.top1 += int(agree.sum())
        self.kl += float(kl.sum())
        if answer.any():
            torch_ll = logp_torch[answer].gather(-1, targets[answer][:, None])[:, 0]
            llama_ll = logp_llama[answer].gather(-1, targets[answer][:, None])[:, 0]
            self.answer_positions += int(answer.sum())
            self.answer_top1 += int(agree[answer].sum())
            self.answer_kl += float(kl[answer].sum())
            self.loglik_torch += float(torch_ll.sum())
            self.loglik_llama += float(llama_ll.sum())
            self.abs_diff += float((torch_ll - llama_ll).abs().sum())

    def result(self) -> RuntimeComparison:
        n, a = max(self.positions, 1), max(self.answer_positions, 1)
        return RuntimeComparison(
            positions=self.positions,
            top1_agreement=self.top1 / n,
            mean_kl_nats=self.kl / n,
            answer_positions=self.answer_positions,
            answer_top1_agreement=self.answer_top1 / a,
            answer_mean_kl_nats=self.answer_kl / a,
            loglik_llama=self.loglik_llama / a,
            loglik_torch=self.loglik_torch / a,
            mean_abs_loglik_diff_nats=self.abs_diff / a,
        )


@torch.no_grad()
def _compare_record(model, llm, item: EncodedRecord, accumulator: _Accumulator) -> torch.Tensor:
    """Add one record's positions to ``accumulator``; return transformers' float64 log-probabilities
    at the answer positions ``[answer positions, vocab]``.

    Position ``i`` (0..len-2) holds the distribution of token ``i + 1``: transformers' from the
    decoder's last hidden state through the output layer, llama.cpp's from ``Llama.scores`` after
    ``eval`` (``logits_all=True``); both turned into float64 log-softmax a block of positions at a
    time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    hidden = base.get_decoder()(input_ids=torch.tensor([item.input_ids], device=device)).last_hidden_state[0]
    llm.reset()
    llm.eval(item.input_ids)
    last = len(item.input_ids) - 1
    targets = torch.tensor(item.input_ids[1:])
    answer = torch.arange(1, last + 1) >= item.prompt_tokens
    answer_logp = []
    for start in range(0, last, _CHUNK_POSITIONS):
        end = min(start + _CHUNK_POSITIONS, last)
        logp_torch = base.get_output_embeddings()(hidden[start:end]).double().log_softmax(-1).cpu()
        logp_llama = torch.from_numpy(np.array(llm.scores[start:end], dtype=np.float64)).log_softmax(-1)
        accumulator.add(logp_torch, logp_llama, targets[start:end], answer[start:end])
        answer_logp.append(logp_torch[answer[start:end]])
    return torch.cat(answer_logp)


def _open_llama(model_path: Path, lora_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int):
    import llama_cpp

    from chat.llama_buffers import llama_loading

    with llama_loading():
        return llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=n_gpu_layers,
            logits_all=True,
            seed=0,
            verbose=False,
        )


def adapter_parity_check(
    base_gguf_path: str | Path,
    adapter_gguf_path: str | Path,
    peft_model,
    tokenizer,
    prompts: Sequence[dict],
    *,
    thresholds: ParityThresholds | None = None,
    max_tokens: int = 1024,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
) -> ParityReport:
    """Compare base + LoRA adapter in llama-cpp-python with transformers + peft on ``prompts``.

    ``prompts``: chat records (``{"messages": [...]}``, last message the assistant answer), encoded
    with ``tuning.training.encode_chat_record`` (``max_tokens`` per record). Each record is evaluated
    once per runtime and every position compared: both runtimes' next-token distributions over the
    full vocabulary (float64 log-softmax of the logits) for top-1 agreement and KL(transformers ‖
    llama.cpp), plus the answer tokens' log-likelihoods. Done twice: the base GGUF alone vs
    ``peft_model`` with its adapter disabled (the reference), then base + ``adapter_gguf_path`` vs
    ``peft_model``; ``thresholds`` (default ``DEFAULT_THRESHOLDS``) decide ``passed``. A few records
    (~1,000 positions) are enough.

    llama.cpp runs with ``logits_all=True`` and a context just large enough for the longest record
    (``Llama.scores`` holds context x vocabulary float32: 50 MB for 256 tokens of SmolLM2); with a
    LoRA it loads the base without mmap (the whole base is read into memory: ~100 MB for
    SmolLM2-135M Q4_1). Each ``Llama`` is closed before the function returns. ``n_threads`` defaults
    to ``os.cpu_count()``; on cores shared with other busy processes 1 thread can be several times
    faster than 2 (llama.cpp's threads wait for each other). About 12 s per 1,000 positions of
    SmolLM2-135M on one core, most of it llama.cpp's evaluation with all logits.

    Raises ``FileNotFoundError`` when a GGUF is missing, ``ValueError`` for empty ``prompts`` or a
    malformed record, and ``ValueError`` from llama-cpp-python when it cannot load the adapter
    (names, shapes or architecture not matching the base).
    """
    started = time.perf_counter()
    thresholds = thresholds or DEFAULT_THRESHOLDS
    base_path, adapter_path = Path(base_gguf_path), Path(adapter_gguf_path)
    for path in (base_path, adapter_path):
        if not path.is_file():
            raise FileNotFoundError(f"not a GGUF file: {path}")
    if not prompts:
        raise ValueError("no prompts to compare")
    encoded = [encode_chat_record(tokenizer, record, max_tokens=max_tokens) for record in prompts]
    encoded = [item for item in encoded if item.answer_tokens and item.prompt_tokens]
    if not encoded:
        raise ValueError("no prompt has both a prompt and an answer part")
    n_ctx = 64 * math.ceil(max(len(item.input_ids) for item in encoded) / 64)
    threads = n_threads or os.cpu_count() or 1
    peft_model.eval()

    base_acc, adapter_acc = _Accumulator(), _Accumulator()
    base_answer_logp: list[torch.Tensor] = []
    llm = _open_llama(base_path, None, n_ctx, threads, n_gpu_layers)
    try:
        with peft_model.disable_adapter():
            for item in encoded:
                base_answer_logp.append(_compare_record(peft_model, llm, item, base_acc))
    finally:
        llm.close()
    shift_kl = 0.0
    llm = _open_llama(base_path, adapter_path, n_ctx, threads, n_gpu_layers)
    try:
        for item, logp_base in zip(encoded, base_answer_logp):
            logp_adapter = _compare_record(peft_model, llm, item, adapter_acc)
            shift_kl += float((logp_adapter.exp() * (logp_adapter - logp_base)).sum())
    finally:
        llm.close()

    base, adapter = base_acc.result(), adapter_acc.result()
    failures = parity_failures(base, adapter, thresholds)
    return ParityReport(
        base=base,
        adapter=adapter,
        adapter_shift_kl_nats=shift_kl / max(adapter.answer_positions, 1),
        thresholds=thresholds,
        passed=not failures,
        reason="; ".join(failures),
        prompts=len(encoded),
        duration_s=time.perf_counter() - started,
    )
