"""GGUF LoRA adapter export (``tuning.gguf_lora``): KV fields, tensor names, shapes and values as
llama.cpp expects them, the q/k rotary permutation, and loading in llama-cpp-python."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from chat.llama_buffers import llama_loading
from tuning.gguf_lora import AdapterExportError, lora_adapter_export, rope_permute_rows

HEADS, KV_HEADS, HIDDEN, KV_DIM, FFN, RANK = 4, 2, 64, 32, 128, 8
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def lora_weights(peft_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"blk.N.attn_q.weight": (A [r, in], B [out, r])}`` from a peft model."""
    found = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            key = f"blk.{layer}.{GGUF_NAMES[name.rsplit('.', 1)[1]]}.weight"
            found[key] = (module.lora_A["default"].weight.detach().numpy(), module.lora_B["default"].weight.detach().numpy())
    return found


@pytest.fixture(scope="module")
def tiny_tensors(tiny_gguf) -> dict[str, np.ndarray]:
    """The tiny base GGUF's tensors as stored (numpy shape [out, in] for projections)."""
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(tiny_gguf).tensors}


def read_adapter(path):
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def test_export_writes_the_adapter_kv_fields_and_base_tensor_names_with_llama_cpp_shapes(tiny_gguf, tiny_tensors,
                                                                                        tiny_trained, tmp_path):
    # Given a LoRA (rank 8, alpha 16) trained on all projections of the tiny model (the default)
    # When it is exported
    path = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf", alpha=16.0)

    # Then the file is an adapter for the base's architecture
    fields, tensors = read_adapter(path)
    assert path == tmp_path / "adapter.gguf"
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 16.0}
    assert not (tmp_path / "adapter.gguf.partial").exists()
    # and holds lora_a / lora_b for each base projection, named like the base tensors, float32, with
    # ggml shapes lora_a [in, r] and lora_b [r, out]
    expected = {}
    for block in range(2):
        for name, in_features, out in (("attn_q", HIDDEN, HIDDEN), ("attn_k", HIDDEN, KV_DIM), ("attn_v", HIDDEN, KV_DIM),
                                       ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", HIDDEN, FFN), ("ffn_up", HIDDEN, FFN),
                                       ("ffn_down", FFN, HIDDEN)):
            expected[f"blk.{block}.{name}.weight.lora_a"] = (in_features, RANK)
            expected[f"blk.{block}.{name}.weight.lora_b"] = (RANK, out)
    assert {name: shape for name, (shape, _, _) in tensors.items()} == expected
    assert {kind for _, kind, _ in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    assert {name.rsplit(".", 1)[0] for name in tensors} <= tiny_tensors.keys()


def test_export_copies_peft_matrices_and_permutes_only_the_q_and_k_lora_b_rows(tiny_gguf, tiny_trained, tmp_path):
    # Given the trained LoRA and its export
    path = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf")
    _, tensors = read_adapter(path)

    # Then every lora_a is peft's lora_A as is, v/o lora_b are peft's lora_B as is, and q/k lora_b
    # rows are permuted like the base GGUF's q (4 heads) and k (2 kv heads)
    weights = lora_weights(tiny_trained.peft_model)
    assert len(weights) == 14  # 7 projections x 2 blocks
    for base_name, (a, b) in weights.items():
        assert np.array_equal(tensors[base_name + ".lora_a"][2], a)
        written_b = tensors[base_name + ".lora_b"][2]
        if ".attn_q." in base_name:
            assert np.array_equal(written_b, rope_permute_rows(b, HEADS))
            assert not np.array_equal(written_b, b)
        elif ".attn_k." in base_name:
            assert np.array_equal(written_b, rope_permute_rows(b, KV_HEADS))
            assert not np.array_equal(written_b, b)
        else:
            assert np.array_equal(written_b, b)


def test_rope_permute_rows_maps_transformers_q_and_k_back_to_the_base_gguf_layout(tiny_tensors, tiny_base):
    # Given transformers' q/k weights (its GGUF loader undid llama.cpp's permutation) and the base file
    model, _ = tiny_base
    stored = tiny_tensors
    attention = model.model.layers[0].self_attn

    # Then permuting transformers' rows gives exactly the stored tensors: the orientation the
    # adapter's lora_b must have
    assert np.array_equal(rope_permute_rows(attention.q_proj.weight.detach().numpy(), HEADS), stored["blk.0.attn_q.weight"])
    assert np.array_equal(rope_permute_rows(attention.k_proj.weight.detach().numpy(), KV_HEADS), stored["blk.0.attn_k.weight"])
    assert not np.array_equal(attention.q_proj.weight.detach().numpy(), stored["blk.0.attn_q.weight"])


def test_rope_permute_rows_interleaves_the_rotary_halves_of_each_head():
    # Given 2 heads of dimension 4 (rows 0..7)
    rows = np.arange(8, dtype=np.float32)[:, None]

    # Then each head's halves [0, 1 | 2, 3] become pairs (0, 2), (1, 3)
    assert rope_permute_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError, match="cannot be split"):
        rope_permute_rows(np.zeros((6, 1)), 2)


def test_export_without_the_permutation_differs_only_in_q_and_k_lora_b(tiny_gguf, tiny_trained, tmp_path):
    good = read_adapter(lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "good.gguf"))[1]
    raw = read_adapter(lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "raw.gguf", _permute_qk=False))[1]

    differing = sorted(name for name in good if not np.array_equal(good[name][2], raw[name][2]))
    assert differing == [f"blk.{b}.{n}.weight.lora_b" for b in range(2) for n in ("attn_k", "attn_q")]


def test_export_writes_only_the_adapted_projections(tiny_gguf, tiny_base, tmp_path):
    # Given a LoRA on q and the MLP down projection only (random B, so nothing is trained)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_base[0]), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))

    # When exported
    fields, tensors = read_adapter(lora_adapter_export(model, tiny_gguf, tmp_path / "subset.gguf"))

    # Then only those tensors are written, with the base's names and shapes (ffn_down: in 128, out 64)
    assert {name: shape for name, (shape, _, _) in tensors.items()} == {
        f"blk.{block}.{name}": shape for block in range(2) for name, shape in (
            ("attn_q.weight.lora_a", (64, 4)), ("attn_q.weight.lora_b", (4, 64)),
            ("ffn_down.weight.lora_a", (128, 4)), ("ffn_down.weight.lora_b", (4, 64)))
    }
    assert fields["adapter.lora.alpha"] == 8.0


def test_exported_adapter_loads_in_llama_cpp_and_changes_its_logits(tiny_gguf, tiny_base, tiny_trained, tmp_path):
    import llama_cpp

    # Given the exported adapter and a templated prompt
    path = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf")
    tokens = tiny_base[1].apply_chat_template([{"role": "user", "content": "When will I get my benefits?"}],
                                              add_generation_prompt=True, tokenize=False)
    logits = []
    # When llama-cpp-python evaluates it with and without the adapter
    for lora in (None, str(path)):
        with llama_loading():
            llm = llama_cpp.Llama(model_path=str(tiny_gguf), lora_path=lora, n_ctx=128, logits_all=True, verbose=False)
        try:
            ids = llm.tokenize(tokens.encode(), add_bos=False, special=True)
            llm.eval(ids)
            logits.append(np.array(llm.scores[len(ids) - 1]))
        finally:
            llm.close()

    # Then the adapter loaded and moved the next-token distribution
    assert np.abs(logits[0] - logits[1]).max() > 0.1


def test_export_refuses_an_alpha_other_than_the_trained_one_and_writes_nothing(tiny_gguf, tiny_trained, tmp_path):
    with pytest.raises(AdapterExportError, match="alpha 32.0 differs from the peft config's lora_alpha 16"):
        lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf", alpha=32.0)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_base_with_other_shapes_and_writes_nothing(tiny_trained, smollm2_gguf, tmp_path):
    # Given the tiny model's adapter and SmolLM2 (hidden 576) as the base
    with pytest.raises(AdapterExportError, match="do not fit base tensor blk.0.attn_q.weight"):
        lora_adapter_export(tiny_trained.peft_model, smollm2_gguf, tmp_path / "adapter.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_the_base_file(tiny_trained, tmp_path):
    with pytest.raises(FileNotFoundError):
        lora_adapter_export(tiny_trained.peft_model, tmp_path / "missing.gguf", tmp_path / "adapter.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_adapter_and_no_partial_file(tiny_gguf, tiny_trained, tmp_path, monkeypatch):
    # Given an adapter already at the output path and a disk that fails while writing tensors
    previous = tmp_path / "adapter.gguf"
    previous.write_bytes(b"previous adapter")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)

    # When the export runs, then it raises and the previous adapter is untouched
    with pytest.raises(OSError, match="No space left"):
        lora_adapter_export(tiny_trained.peft_model, tiny_gguf, previous)
    assert previous.read_bytes() == b"previous adapter"
    assert list(tmp_path.iterdir()) == [previous]
