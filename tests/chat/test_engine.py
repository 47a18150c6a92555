"""The model engine: streaming, bounded queue, cancel, and swapping models while chats run.

Unit tests use ``FakeChatModel`` behind the real ``Engine``; the last tests run the real GGUF model.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from chat.engine import Engine, EngineBusy, EngineError, ModelFilesMismatch, ModelKey
from tests.chat.conftest import FakeChatModel

BASE = ModelKey("/models/base.gguf")
TUNED = ModelKey("/models/base.gguf", "/models/adapter-v2.gguf")


def make_engine(tokens, *, queue_size=2, delay_s=0.0, gate=None):
    models: list[FakeChatModel] = []

    def load(key):
        model = FakeChatModel(key, tokens, delay_s=delay_s, gate=gate)
        models.append(model)
        return model

    return Engine(load_model=load, queue_size=queue_size), models


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_submit_streams_tokens_in_order_and_records_stats():
    # given an engine serving a model that answers four tokens
    engine, models = make_engine(["Hello", " there", " [1]", "."])
    engine.ensure(BASE)
    try:
        # when a chat is submitted and iterated
        generation = engine.submit([{"role": "user", "content": "hi"}], max_tokens=10, temperature=0.0)
        pieces = list(generation)
        # then the pieces arrive in order and the stats count them
        assert pieces == ["Hello", " there", " [1]", "."]
        assert generation.stats.tokens == 4
        assert generation.stats.finish_reason == "stop"
        assert generation.stats.first_token_ms is not None
        assert generation.stats.model_key == BASE
        assert models[0].calls == [[{"role": "user", "content": "hi"}]]
    finally:
        engine.shutdown()


def test_max_tokens_is_passed_to_the_model():
    engine, _ = make_engine(["a", "b", "c", "d"])
    engine.ensure(BASE)
    try:
        generation = engine.submit([{"role": "user", "content": "hi"}], max_tokens=2)
        assert list(generation) == ["a", "b"]
        assert generation.stats.finish_reason == "length"
    finally:
        engine.shutdown()


def test_submit_without_a_loaded_model_raises():
    engine, models = make_engine(["x"])
    with pytest.raises(EngineError, match="no model loaded"):
        engine.submit([{"role": "user", "content": "hi"}])
    assert models == []


def test_full_queue_raises_engine_busy_and_leaves_queued_requests_untouched():
    # given a model held on its first request and a queue of two
    gate = threading.Event()
    engine, _ = make_engine(["ok"], queue_size=2, gate=gate)
    engine.ensure(BASE)
    try:
        running = engine.submit([{"role": "user", "content": "1"}])
        wait_until(lambda: engine._current.active is running)
        queued = [engine.submit([{"role": "user", "content": str(n)}]) for n in (2, 3)]
        # when one more request arrives
        with pytest.raises(EngineBusy) as busy:
            engine.submit([{"role": "user", "content": "4"}])
        # then it is refused with a retry hint, and the others still complete once the model frees up
        assert busy.value.retry_after_s >= 1.0
        assert engine.has_capacity() is False
        gate.set()
        assert [list(g) for g in [running, *queued]] == [["ok"], ["ok"], ["ok"]]
        assert engine.has_capacity() is True
    finally:
        gate.set()
        engine.shutdown()


def test_cancel_stops_generation_at_the_next_token():
    # given a slow model producing 200 tokens
    engine, _ = make_engine([f" t{i}" for i in range(200)], delay_s=0.01)
    engine.ensure(BASE)
    cancel = threading.Event()
    try:
        generation = engine.submit([{"role": "user", "content": "hi"}], max_tokens=500, cancel=cancel)
        pieces = []
        # when the caller's cancel event is set after three tokens
        for piece in generation:
            pieces.append(piece)
            if len(pieces) == 3:
                cancel.set()
        # then the stream ends within a token or two, marked cancelled
        assert 3 <= len(pieces) <= 5
        assert generation.stats.finish_reason == "cancelled"
        assert generation.stats.tokens == len(pieces)
    finally:
        engine.shutdown()


def test_closing_the_iterator_early_stops_the_model_and_the_thread_serves_the_next_request():
    engine, _ = make_engine([f" t{i}" for i in range(200)], delay_s=0.01)
    engine.ensure(BASE)
    try:
        generation = engine.submit([{"role": "user", "content": "hi"}], max_tokens=500)
        iterator = iter(generation)
        assert next(iterator) == " t0"
        iterator.close()
        wait_until(lambda: generation.stats.finish_reason == "cancelled")
        assert generation.stats.tokens < 10
        follow_up = engine.submit([{"role": "user", "content": "again"}], max_tokens=2)
        assert list(follow_up) == [" t0", " t1"]
    finally:
        engine.shutdown()


def test_a_request_cancelled_while_queued_is_skipped():
    gate = threading.Event()
    engine, models = make_engine(["ok"], gate=gate)
    engine.ensure(BASE)
    try:
        running = engine.submit([{"role": "user", "content": "1"}])
        cancel = threading.Event()
        queued = engine.submit([{"role": "user", "content": "2"}], cancel=cancel)
        cancel.set()
        gate.set()
        assert list(running) == ["ok"]
        assert list(queued) == []
        assert queued.stats.finish_reason == "cancelled"
        assert [call[0]["content"] for call in models[0].calls] == ["1"]
    finally:
        gate.set()
        engine.shutdown()


def test_swap_while_generating_finishes_in_flight_chats_on_the_old_model_then_frees_it():
    # given a generation running (held) on the base model
    gate = threading.Event()
    engine, models = make_engine(["old"], gate=gate)
    engine.ensure(BASE)
    try:
        in_flight = engine.submit([{"role": "user", "content": "before swap"}])
        queued_on_old = engine.submit([{"role": "user", "content": "queued before swap"}])
        wait_until(lambda: engine._current.active is in_flight)
        old = engine._current
        # when the engine switches to the tuned adapter while it runs
        engine.ensure(TUNED)
        models[1].tokens = ["new"]
        after = engine.submit([{"role": "user", "content": "after swap"}])
        # then the new request is served by the new model at once, while the old one is still busy
        assert list(after) == ["new"]
        assert after.stats.model_key == TUNED
        assert engine.current_key == TUNED
        assert old.finished.is_set() is False
        # and the chats started before the swap finish on the old model, which is then freed
        gate.set()
        assert list(in_flight) == ["old"]
        assert list(queued_on_old) == ["old"]
        assert in_flight.stats.model_key == BASE
        wait_until(old.finished.is_set)
        assert models[0].closed is True
        assert models[1].closed is False
        assert old.model is None
    finally:
        gate.set()
        engine.shutdown()


def test_ensure_with_the_current_key_does_not_reload():
    engine, models = make_engine(["x"])
    try:
        engine.ensure(BASE)
        engine.ensure(BASE)
        assert len(models) == 1
    finally:
        engine.shutdown()


def test_a_failed_load_keeps_serving_the_previous_model():
    def load(key):
        if key == TUNED:
            raise EngineError("could not load adapter")
        return FakeChatModel(key, ["still here"])

    engine = Engine(load_model=load, queue_size=2)
    engine.ensure(BASE)
    try:
        with pytest.raises(EngineError, match="could not load adapter"):
            engine.ensure(TUNED)
        assert engine.current_key == BASE
        assert list(engine.submit([{"role": "user", "content": "hi"}])) == ["still here"]
    finally:
        engine.shutdown()


def test_a_model_error_is_raised_to_the_consumer_and_the_thread_keeps_serving():
    class Broken(FakeChatModel):
        def create_chat_completion(self, messages, **options):
            if messages[0]["content"] == "boom":
                raise RuntimeError("llama_decode returned -1")
            return super().create_chat_completion(messages, **options)

    engine = Engine(load_model=lambda key: Broken(key, ["fine"]), queue_size=2)
    engine.ensure(BASE)
    try:
        with pytest.raises(EngineError, match="llama_decode returned -1"):
            list(engine.submit([{"role": "user", "content": "boom"}]))
        assert list(engine.submit([{"role": "user", "content": "ok"}])) == ["fine"]
    finally:
        engine.shutdown()


# --- the real GGUF model ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_real_model_sees_the_chatml_prompt_of_its_template_and_stops_at_its_end_token(settings):
    # given the real GGUF (SmolLM2-135M-Instruct, whose chat template is ChatML) loaded by the real
    # loader, with the llama_cpp.Llama it returns kept to read what the model was fed
    from chat.engine import load_llama

    loaded = []
    engine = Engine(load_model=lambda key: loaded.append(load_llama(key)) or loaded[-1])
    engine.ensure(ModelKey(settings.LLM_MODEL_PATH))
    try:
        # when a system + user conversation is answered greedily with room to spare (48 tokens)
        generation = engine.submit(
            [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "Say hello."}],
            max_tokens=48, temperature=0.0,
        )
        answer = "".join(generation)
        llama = loaded[0]
        # (read before shutdown, which frees the model)
        fed = llama.detokenize(llama.input_ids[: llama.n_tokens].tolist(), special=True).decode()
        end_of_sequence = llama.detokenize([llama.token_eos()], special=True)
    finally:
        engine.shutdown(timeout_s=60)
    # then the template's end-of-turn token is the model's end of sequence
    assert end_of_sequence == b"<|im_end|>"
    # and the model was fed exactly the ChatML prompt of the two messages, then its own answer
    assert fed == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nSay hello.<|im_end|>\n"
                   "<|im_start|>assistant\n" + answer)
    # and it stopped by itself at that token, before max_tokens, which is not part of the answer
    assert generation.stats.finish_reason == "stop"
    assert generation.stats.tokens < 48
    assert answer.startswith("Hello")
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer


@pytest.mark.e2e
def test_real_model_cancel_stops_generation(real_engine):
    cancel = threading.Event()
    generation = real_engine.submit(
        [{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=200, cancel=cancel,
    )
    pieces = []
    for piece in generation:
        pieces.append(piece)
        if len(pieces) == 2:
            cancel.set()
    assert 2 <= len(pieces) <= 4
    assert generation.stats.finish_reason == "cancelled"


def test_a_key_whose_file_digest_differs_is_refused_and_the_current_model_keeps_serving(tmp_path):
    # given an engine serving a base whose recorded digest matches
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF base")
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF adapter")
    engine, models = make_engine(["ok"])
    good = ModelKey(str(base), base_sha256=hashlib.sha256(b"GGUF base").hexdigest())
    engine.ensure(good)
    # when asked to serve an adapter whose recorded digest is another file's
    wrong = ModelKey(str(base), str(adapter), base_sha256=good.base_sha256, adapter_sha256="0" * 64)
    with pytest.raises(ModelFilesMismatch) as refused:
        engine.ensure(wrong)
    # then it is refused with both digests, nothing was loaded, and the base still answers
    assert str(refused.value) == f"{adapter} has sha256 {hashlib.sha256(b'GGUF adapter').hexdigest()}, but {'0' * 64} was recorded for it"
    assert engine.current_key == good and [m.key for m in models] == [good]
    assert "".join(engine.submit([{"role": "user", "content": "hi"}])) == "ok"
    # and a missing file is an engine error too, before any load
    with pytest.raises(EngineError, match="model file not found"):
        engine.ensure(ModelKey(str(tmp_path / "gone.gguf"), base_sha256="1" * 64))
    assert len(models) == 1
    engine.shutdown()


def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from chat import model_files

    reads = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        reads.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(model_files, "open", counting_open, raising=False)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"first")
    assert model_files.file_sha256(path) == model_files.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert reads == [str(path)]  # hashed once
    path.write_bytes(b"second, longer")  # replaced in place: new size and mtime
    assert model_files.file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()
    assert reads == [str(path), str(path)]


def test_poll_joined_joins_the_pieces_already_queued_and_keeps_the_end_for_the_next_call():
    from chat.engine import _DONE, Generation

    generation = Generation(messages=[], options={})
    for item in ("Re", "turns ", "take", _DONE):
        generation._events.put(item)
    # a reader that fell behind gets every queued piece in one call, and the end on the next
    assert generation.poll_joined(0.1) == "Returns take"
    assert generation.poll_joined(0.1) == ""
    assert generation.poll_joined(0.1) == ""
    # nothing queued: None after the timeout, as poll
    idle = Generation(messages=[], options={})
    assert idle.poll_joined(0.01) is None
    # an error behind the text: the text first, then the error
    failing = Generation(messages=[], options={})
    failing._events.put("partial")
    failing._events.put(RuntimeError("llama_decode failed (-1)"))
    assert failing.poll_joined(0.1) == "partial"
    with pytest.raises(EngineError, match="llama_decode failed"):
        failing.poll_joined(0.1)


def test_a_listener_is_woken_by_each_queued_item_and_at_once_for_items_already_waiting():
    from chat.engine import _DONE, Generation

    generation = Generation(messages=[], options={})
    generation.put("Returns")
    wakes = []
    # set after an item was queued: woken now, so a reader that clears its event first misses nothing
    generation.set_listener(lambda: wakes.append(generation.poll_joined(0)))
    assert wakes == ["Returns"]
    # each item the model thread queues wakes it; poll(0) reads without waiting
    worker = threading.Thread(target=lambda: [generation.put(item) for item in (" take 60 days", _DONE)])
    worker.start()
    worker.join()
    assert wakes == ["Returns", " take 60 days", ""]
    # removed: the model thread no longer calls it
    generation.set_listener(None)
    generation.put("late")
    assert len(wakes) == 3 and generation.poll(0) == ""
