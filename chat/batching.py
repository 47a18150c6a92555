"""Continuous batching: one llama.cpp context decodes many conversations together.

``BatchModel`` owns a GGUF model (plus optional LoRA adapter) and one llama.cpp context with
``slots`` sequences (``n_seq_max``), through llama-cpp-python's low-level API. ``BatchedModel`` is the
scheduler: one thread owns that context and, on every step,

1. admits waiting requests into free sequence slots (tokenising their chat-templated prompt and
   giving each its own sampler chain: repeat penalty, then greedy or temperature sampling);
2. builds a ``llama_batch``: the last sampled token of every decoding sequence (logits on), then
   up to ``prefill_chunk`` prompt tokens of sequences still prefilling (oldest first; logits only on
   a prompt's last token), so a long prompt is prefilled in chunks between decode steps instead of
   stalling the others;
3. runs one ``llama_decode`` over that batch and samples one token per sequence with output
   (``llama_sampler_sample(chain, ctx, i)`` on its row ``i`` of the batch). With a KV stream per
   sequence (the default) the prompt chunk, of one sequence, goes in a ``llama_decode`` of its own
   right after the decodes: llama.cpp would otherwise split the mixed batch into one-token
   micro-batches (measured: prefill at decode speed, TTFT at N = 4 twice the serial bound);
4. finishes sequences at end of generation (``llama_vocab_is_eog``), ``max_tokens``, or cancel, and
   frees their KV cache (``llama_memory_seq_rm(mem, seq_id, -1, -1)``) so the slot is reused.

Requests beyond the free slots wait in a bounded queue (``queue_size``); a full queue raises
``EngineBusy`` with a retry delay. ``BatchedModel`` has ``LoadedModel``'s interface (``put``,
``retry_after_s``, ``pending``, ``retire``/``finished``), so ``chat.engine.Engine`` swaps batched
models exactly like serial ones: requests already admitted or queued finish on the old model.

Reference schedulers: llama.cpp's ``examples/parallel/parallel.cpp`` and ``tools/server`` (slots,
``n_seq_max``, one batch per step, chunked prompt processing via ``n_batch``) and
llama-cpp-python's ``examples/server``. Greedy text can differ between batch sizes (llama.cpp's
matrix kernels reduce in a different order for another batch shape), so nothing here promises the
same text as a serial run.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from chat.engine import _DONE, EngineBusy, EngineError, Generation, ModelKey, model_files_check
from chat.llama_buffers import model_params_apply
from chat.weight_types import WeightTypeError, serving_model_path

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2
_PIECE_BYTES = 256
_backend_ready = threading.Lock()
_backend_initialised = False


def _llama():
    """The ``llama_cpp`` module with its backend initialised once and its log silenced."""
    global _backend_initialised
    import llama_cpp
    from llama_cpp._logger import set_verbose

    with _backend_ready:
        if not _backend_initialised:
            set_verbose(False)
            llama_cpp.llama_backend_init()
            _backend_initialised = True
    return llama_cpp


class BatchModel:
    """A GGUF model, optional LoRA adapter and one llama.cpp context of ``slots`` sequences.

    ``slot_context_tokens``: KV cells each sequence may use (prompt + answer, tokens);
    ``batch_tokens``: the most tokens one ``llama_decode`` takes (``n_batch`` = ``n_ubatch``);
    ``threads``: CPU threads for decode and prompt processing; ``gpu_layers``: layers offloaded.
    Each sequence has a KV stream of its own (``kv_unified`` false) unless ``kv_unified``;
    ``flash_attention`` off by default here, as ``llama_cpp.Llama``'s (the serial engine's);
    ``load_batch_model`` turns it on (``LLM_FLASH_ATTENTION``, measured faster when batching).
    Raises ``EngineError`` when a file is missing or llama.cpp cannot load it. Not thread-safe: only
    the scheduler thread of its ``BatchedModel`` calls it after construction.
    """

    def __init__(self, key: ModelKey, *, slots: int, slot_context_tokens: int, batch_tokens: int, threads: int,
                 gpu_layers: int = 0, kv_unified: bool = False, flash_attention: bool = False):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        ll = _llama()
        for path in filter(None, (key.base_model_path, key.adapter_path)):
            if not Path(path).is_file():
                raise EngineError(f"model file not found: {path}")
        self.key = key
        self.slots = slots
        self.kv_unified = kv_unified
        self.slot_context_tokens = slot_context_tokens
        self.batch_tokens = batch_tokens
        self.model = self.ctx = self.adapter = None
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        model_params_apply(model_params)
        try:
            base_path = serving_model_path(key.base_model_path, key.base_sha256)
        except WeightTypeError as error:
            raise EngineError(str(error)) from error
        self.model = ll.llama_model_load_from_file(base_path.encode(), model_params)
        if not self.model:
            raise EngineError(f"could not load {key.base_model_path}")
        try:
            if key.adapter_path:
                self.adapter = ll.llama_adapter_lora_init(self.model, key.adapter_path.encode())
                if not self.adapter:
                    raise EngineError(f"could not load the LoRA adapter {key.adapter_path}")
            params = ll.llama_context_default_params()
            params.n_seq_max = slots
            params.kv_unified = kv_unified
            # Without a unified cache llama.cpp gives every sequence n_ctx / n_seq_max cells.
            params.n_ctx = slot_context_tokens * slots
            params.n_batch = params.n_ubatch = batch_tokens
            params.n_threads = params.n_threads_batch = threads
            params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention
                                      else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            self.ctx = ll.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise EngineError(f"could not create a llama.cpp context for {key}")
            if self.adapter:
                adapters = (ll.llama_adapter_lora_p_ctypes * 1)(self.adapter)
                scales = (ctypes.c_float * 1)(1.0)
                if ll.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                    raise EngineError(f"could not apply the LoRA adapter {key.adapter_path}")
            self.vocab = ll.llama_model_get_vocab(self.model)
            self.memory = ll.llama_get_memory(self.ctx)
            self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
            self.eog_tokens = [t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)]
            template = ll.llama_model_chat_template(self.model, None)
            if not template:
                raise EngineError(f"{key.base_model_path} has no chat template (tokenizer.chat_template)")
            eos, bos = ll.llama_vocab_eos(self.vocab), ll.llama_vocab_bos(self.vocab)
            self.formatter = Jinja2ChatFormatter(
                template=template.decode("utf-8"), eos_token=self.piece(eos, special=True).decode("utf-8", "replace"),
                bos_token=self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            )
            self.batch = ll.llama_batch_init(batch_tokens, 0, 1)
        except BaseException:
            self.close()
            raise

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of ``token`` (special tokens rendered only when ``special``)."""
        ll = _llama()
        buffer = ctypes.create_string_buffer(_PIECE_BYTES)
        size = ll.llama_token_to_piece(self.vocab, token, buffer, _PIECE_BYTES, 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = ll.llama_token_to_piece(self.vocab, token, buffer, -size, 0, special)
        return buffer.raw[:size]

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """``messages`` (``[{"role", "content"}]``) in the model's chat template, as token ids (the
        template adds the special tokens itself, as ``Llama.create_chat_completion`` does)."""
        ll = _llama()
        text = self.formatter(messages=messages).prompt.encode("utf-8")
        capacity = len(text) + 8
        tokens = (ll.llama_token * capacity)()
        count = ll.llama_tokenize(self.vocab, text, len(text), tokens, capacity, False, True)
        if count < 0:
            raise EngineError("the prompt could not be tokenised")
        return list(tokens[:count])

    def sampler(self, *, temperature: float, repeat_penalty: float, seed: int = 0, ignore_eos: bool = False):
        """A new sampler chain: repeat penalty over the last 64 tokens (``Llama``'s default
        ``last_n_tokens_size``), then greedy (``temperature`` 0) or top-k 40 / top-p 0.95 / min-p 0.05 /
        temperature / seeded draw (``Llama._init_sampler``'s defaults); with ``ignore_eos`` first a
        -inf logit bias on every end-of-generation token (llama-server's and vLLM's ``ignore_eos``,
        for benchmarks of a fixed length). Free with ``llama_sampler_free``."""
        ll = _llama()
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if ignore_eos and self.eog_tokens:
            biases = (ll.llama_logit_bias * len(self.eog_tokens))(
                *[ll.llama_logit_bias(token=t, bias=float("-inf")) for t in self.eog_tokens])
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(self.n_vocab, 64, repeat_penalty, 0.0, 0.0))
        if temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(40))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(0.95, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(0.05, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def close(self) -> None:
        """Free the batch, context, adapter and model (idempotent)."""
        ll = _llama()
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.adapter:
            ll.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None


def load_batch_model(key: ModelKey, *, slots: int | None = None) -> BatchModel:
    """Load ``key`` for continuous batching with the ``LLM_*`` settings (``LLM_SLOTS`` sequences of
    ``LLM_SLOT_CONTEXT_TOKENS`` each, ``LLM_BATCH_TOKENS`` per decode, ``LLM_THREADS``, ``LLM_GPU_LAYERS``,
    ``LLM_KV_UNIFIED``, ``LLM_FLASH_ATTENTION``); ``slots`` overrides ``LLM_SLOTS``. Raises ``EngineError``
    (with the reason for a missing or non-GGUF file: ``chat.engine.model_files_check``)."""
    model_files_check(key)
    return BatchModel(
        key, slots=slots or settings.LLM_SLOTS, slot_context_tokens=settings.LLM_SLOT_CONTEXT_TOKENS,
        batch_tokens=settings.LLM_BATCH_TOKENS, threads=settings.LLM_THREADS,
        gpu_layers=settings.LLM_GPU_LAYERS, kv_unified=settings.LLM_KV_UNIFIED,
        flash_attention=settings.LLM_FLASH_ATTENTION,
    )


@dataclass
class _Sequence:
    """One admitted request in slot ``seq_id``: its prompt, progress and sampler."""

    generation: Generation
    seq_id: int
    prompt: list[int]
    sampler: object
    max_tokens: int
    n_past: int = 0  # tokens of this sequence in the KV cache
    next_token: int | None = None  # sampled, to be decoded in the next step
    generated: int = 0
    decoder: object = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    admitted_at: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    last_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


class BatchedModel:
    """The continuous-batching scheduler over one ``BatchModel`` (see the module docstring).

    ``queue_size`` bounds requests *waiting* for a slot beyond the free ones (admitted ones are not
    counted);
    ``prefill_chunk`` caps the prompt tokens added to one decode step (default
    ``LLM_PREFILL_CHUNK``). ``put``/``retry_after_s``/``pending``/``retired``/``finished``/``thread``
    as ``chat.engine.LoadedModel``; ``active_count()`` is the number of sequences in slots.
    """

    def __init__(self, key: ModelKey, model: BatchModel, *, queue_size: int, prefill_chunk: int | None = None):
        self.key = key
        self.model = model
        self.slots = model.slots
        self.prefill_chunk = max(1, prefill_chunk or settings.LLM_PREFILL_CHUNK)
        self.queue_size = max(queue_size, 1)
        self.requests: queue.Queue[Generation] = queue.Queue(maxsize=self.queue_size + self.slots)
        self.retired = threading.Event()
        self.finished = threading.Event()
        self.active: list[_Sequence] = []
        self.free_ids = list(range(self.slots))
        self.recent_generation_s = 3.0  # moving average of admitted-to-finished, for retry delays
        self.steps = 0  # llama_decode calls so far (for tests and benchmarks)
        self.peak_decoding = 0  # the most sequences one step has decoded together
        self.thread = threading.Thread(target=self._run, name=f"llm-batch-{key.base_model_path[-32:]}", daemon=True)
        self.thread.start()

    def put(self, generation: Generation) -> None:
        """Queue ``generation`` for a slot; raises ``EngineBusy`` when ``queue_size`` requests already
        wait beyond the free slots (requests arriving during a decode step are admitted after it, so
        free slots count as room)."""
        if self.requests.qsize() >= self.queue_size + len(self.free_ids):
            raise EngineBusy(self.retry_after_s())
        try:
            self.requests.put_nowait(generation)
        except queue.Full:
            raise EngineBusy(self.retry_after_s()) from None

    def retry_after_s(self) -> float:
        """Suggested wait (s) before retrying: the time for the queue ahead to reach a slot, i.e. the
        average generation time times the queued requests per slot, at least 1 s."""
        waves = 1 + max(0, self.requests.qsize() - len(self.free_ids)) // max(self.slots, 1)
        return round(max(1.0, self.recent_generation_s * waves), 1)

    def pending(self) -> int:
        """Requests waiting plus sequences in slots."""
        return self.requests.qsize() + len(self.active)

    def active_count(self) -> int:
        """Sequences currently in slots (prefilling or decoding)."""
        return len(self.active)

    # --- scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self.active:
                    try:
                        generation = self.requests.get(timeout=_IDLE_POLL_S)
                    except queue.Empty:
                        if self.retired.is_set() and self.requests.empty():
                            break  # retired: every submit happened before the flag was set
                        continue
                    self._admit(generation)
                while self.free_ids:
                    try:
                        self._admit(self.requests.get_nowait())
                    except queue.Empty:
                        break
                self._drop_cancelled()
                if self.active:
                    self._step()
        except BaseException as error:  # a fatal llama.cpp error: fail everything rather than hang
            logger.exception("the batch scheduler of %s stopped", self.key)
            for sequence in list(self.active):
                self._finish(sequence, "error", error)
            while True:
                try:
                    self.requests.get_nowait().put(error)
                except queue.Empty:
                    break
        finally:
            self._free()

    def _admit(self, generation: Generation) -> None:
        stats = generation.stats
        stats.model_key = self.key
        stats.queued_ms = (time.perf_counter() - generation.submitted_at) * 1000
        if generation.cancelled():
            stats.finish_reason = "cancelled"
            generation.put(_DONE)
            return
        options = generation.options
        try:
            prompt = self.model.prompt_tokens(generation.messages)
            max_tokens = int(options.get("max_tokens") or settings.LLM_MAX_TOKENS)
            if len(prompt) + 1 > self.model.slot_context_tokens:
                raise EngineError(f"the prompt ({len(prompt)} tokens) does not fit a sequence's context "
                                  f"({self.model.slot_context_tokens} tokens)")
            max_tokens = min(max_tokens, self.model.slot_context_tokens - len(prompt))
            sampler = self.model.sampler(temperature=float(options.get("temperature") or 0.0),
                                         repeat_penalty=float(options.get("repeat_penalty") or 1.0),
                                         seed=int(options.get("seed") or 0),
                                         ignore_eos=bool(options.get("ignore_eos")))
        except Exception as error:  # bad input for this request only; the scheduler keeps serving
            logger.warning("request refused by %s: %s", self.key, error)
            stats.finish_reason = "error"
            generation.put(error if isinstance(error, EngineError) else EngineError(str(error)))
            return
        sequence = _Sequence(generation=generation, seq_id=self.free_ids.pop(0), prompt=prompt, sampler=sampler,
                             max_tokens=max_tokens)
        self.active.append(sequence)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.active if s.generation.cancelled()]:
            self._finish(sequence, "cancelled")

    def _step(self) -> None:
        """One scheduling step: the next token of every decoding sequence and up to
        ``prefill_chunk`` prompt tokens. With per-sequence KV streams (``kv_unified`` off) llama.cpp
        splits a batch into micro-batches holding the same number of tokens of every sequence, so a
        prompt chunk mixed with one-token decodes would be evaluated a token at a time: there the
        decodes go in one ``llama_decode`` and the chunk (of one sequence) in the next. With a unified
        KV cache both go in one ``llama_decode``."""
        decoding = [s for s in self.active if not s.prefilling and s.next_token is not None]
        self.peak_decoding = max(self.peak_decoding, len(decoding))
        if self.model.kv_unified:
            self._decode(decoding, self._prefill_plan(self.model.batch_tokens - len(decoding), many=True))
            return
        if decoding:
            self._decode(decoding, [])
        plan = self._prefill_plan(self.model.batch_tokens, many=False)
        if plan:
            self._decode([], plan)

    def _prefill_plan(self, room: int, *, many: bool) -> list[tuple[_Sequence, int]]:
        """``[(sequence, tokens)]`` of prompt chunks for one batch, oldest sequence first, at most
        ``prefill_chunk`` (and ``room``) tokens in all; one sequence only unless ``many``."""
        budget = min(self.prefill_chunk, room)
        plan = []
        for sequence in self.active:
            if budget <= 0 or (plan and not many):
                break
            if sequence.prefilling:
                take = min(budget, len(sequence.prompt) - sequence.n_past)
                plan.append((sequence, take))
                budget -= take
        return plan

    def _decode(self, decoding: list[_Sequence], prefill: list[tuple[_Sequence, int]]) -> None:
        """One ``llama_decode`` over the next token of each of ``decoding`` and the prompt chunks of
        ``prefill``; then one token sampled for every sequence with output."""
        ll = _llama()
        batch = self.model.batch
        n = 0
        outputs: list[tuple[_Sequence, int]] = []

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq_id
            batch.logits[n] = logits
            n += 1

        for sequence in decoding:
            outputs.append((sequence, n))
            add(sequence.next_token, sequence.n_past, sequence.seq_id, True)
        for sequence, take in prefill:
            for offset in range(take):
                position = sequence.n_past + offset
                last = position == len(sequence.prompt) - 1
                if last:
                    outputs.append((sequence, n))
                add(sequence.prompt[position], position, sequence.seq_id, last)
        if n == 0:
            return
        batch.n_tokens = n
        status = ll.llama_decode(self.model.ctx, batch)
        self.steps += 1
        if status != 0:
            # 1: no KV slot (should not happen: each sequence fits its own context); others fatal.
            error = EngineError(f"llama_decode failed ({status})")
            for sequence in decoding + [s for s, _ in prefill]:
                self._finish(sequence, "error", error)
            if status < 0:
                raise error
            return
        for sequence, take in prefill:
            sequence.n_past += take
        for sequence in decoding:
            sequence.n_past += 1  # the token decoded this step is now in the cache
        for sequence, row in outputs:
            self._emit(sequence, ll.llama_sampler_sample(sequence.sampler, self.model.ctx, row))

    def _emit(self, sequence: _Sequence, token: int) -> None:
        ll = _llama()
        generation, stats = sequence.generation, sequence.generation.stats
        if ll.llama_vocab_is_eog(self.model.vocab, token):
            self._flush_text(sequence, final=True)
            self._finish(sequence, "stop")
            return
        sequence.generated += 1
        stats.tokens += 1
        now = time.perf_counter()
        if sequence.first_at is None:
            sequence.first_at = now
            stats.first_token_ms = (now - generation.submitted_at) * 1000
        sequence.last_at = now
        text = sequence.decoder.decode(self.model.piece(token))
        if text:
            generation.put(text)
        if sequence.generated >= sequence.max_tokens:
            self._flush_text(sequence, final=True)
            self._finish(sequence, "length")
            return
        sequence.next_token = token

    @staticmethod
    def _flush_text(sequence: _Sequence, *, final: bool) -> None:
        tail = sequence.decoder.decode(b"", final=final)
        if tail:
            sequence.generation.put(tail)

    def _finish(self, sequence: _Sequence, reason: str, error: BaseException | None = None) -> None:
        ll = _llama()
        stats = sequence.generation.stats
        stats.finish_reason = reason
        if sequence.first_at is not None and sequence.last_at is not None:
            stats.decode_ms = (sequence.last_at - sequence.first_at) * 1000
        ll.llama_memory_seq_rm(self.model.memory, sequence.seq_id, -1, -1)
        ll.llama_sampler_free(sequence.sampler)
        self.active.remove(sequence)
        self.free_ids.append(sequence.seq_id)
        elapsed = time.perf_counter() - sequence.admitted_at
        self.recent_generation_s = 0.8 * self.recent_generation_s + 0.2 * elapsed
        sequence.generation.put(error if error is not None else _DONE)

    def _free(self) -> None:
        try:
            self.model.close()
        except Exception:  # freeing must not kill the process
            logger.exception("closing %s failed", self.key)
        self.model = None
        self.finished.set()
        logger.info("freed batched model %s", self.key)
