"""A tiny llama-architecture GGUF with random weights, for tests of the tuning loop in CI time.

``write_tiny_llama_gguf`` writes a model that both runtimes load: llama-cpp-python (serving) and
transformers (training, through its GGUF loader). It copies the tokenizer and chat template from a
real GGUF (SmolLM2's: 49,152 tokens, ChatML template), so records are tokenized exactly as for the
real model, and stores the q and k projections with rows permuted for rotary embedding, as llama.cpp's
``convert_hf_to_gguf.py`` (``LlamaModel.permute``) does; transformers' GGUF loader reverses that
permutation, so a LoRA adapter exported from a peft model on top of it meets the same pitfall as
on the real model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# Keys copied from the tokenizer GGUF: everything under "tokenizer." (vocabulary, merges, token types,
# special token ids, flags, chat template).
_TOKENIZER_PREFIX = "tokenizer."


def _hf_to_gguf_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection (``[n_head * head_dim, hidden]``) reordered from Hugging Face's
    rotate-half layout to llama.cpp's interleaved pairs (``LlamaModel.permute`` in llama.cpp's
    ``convert_hf_to_gguf.py``; ``n_head`` is the head count for q and the kv head count for k)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    tokenizer_gguf_path: str | Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """Write a llama-architecture GGUF with random F32 weights to ``path`` and return it.

    ``hidden`` must be a multiple of ``heads`` and ``heads`` of ``kv_heads``; ``head_dim =
    hidden // heads`` must be even (rotary pairs). The vocabulary, merges, special tokens and
    ``tokenizer.chat_template`` come from ``tokenizer_gguf_path`` (its ``tokenizer.*`` KV fields,
    read with ``gguf.GGUFReader``). The output layer is tied to ``token_embd.weight`` (no
    ``output.weight`` tensor), like SmolLM2. Weights are drawn from a seeded normal distribution
    scaled so next-token distributions are peaked rather than nearly uniform (top-1 comparisons
    between runtimes are then meaningful). With SmolLM2's vocabulary and ``hidden=64`` the file is
    about 15 MB, written in ~3 s (most of it ``GGUFReader`` parsing the tokenizer fields); loading it
    in transformers takes ~15 s for the same reason, so share it across tests (session fixtures).

    Raises ``ValueError`` for inconsistent sizes.
    """
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(f"inconsistent sizes: hidden={hidden}, heads={heads}, kv_heads={kv_heads}")
    path = Path(path)
    head_dim = hidden // heads
    reader = gguf.GGUFReader(tokenizer_gguf_path)
    tokenizer_fields = {key: field for key, field in reader.fields.items() if key.startswith(_TOKENIZER_PREFIX)}
    vocab = len(tokenizer_fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny-llama-test")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in tokenizer_fields.items():
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), value_type)

    # Shapes are numpy (rows = output features, columns = input features), as convert_hf_to_gguf
    # writes them; ggml's ne is the reverse.
    writer.add_tensor("token_embd.weight", normal(vocab, hidden, std=0.3))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    std_in = hidden**-0.5
    for block in range(layers):
        prefix = f"blk.{block}."
        q = normal(heads * head_dim, hidden, std=std_in)
        k = normal(kv_heads * head_dim, hidden, std=std_in)
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", _hf_to_gguf_rope_permute(q, heads))
        writer.add_tensor(prefix + "attn_k.weight", _hf_to_gguf_rope_permute(k, kv_heads))
        writer.add_tensor(prefix + "attn_v.weight", normal(kv_heads * head_dim, hidden, std=std_in))
        writer.add_tensor(prefix + "attn_output.weight", normal(hidden, heads * head_dim, std=std_in))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", normal(intermediate, hidden, std=std_in))
        writer.add_tensor(prefix + "ffn_up.weight", normal(intermediate, hidden, std=std_in))
        writer.add_tensor(prefix + "ffn_down.weight", normal(hidden, intermediate, std=intermediate**-0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
