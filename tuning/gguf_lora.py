"""Export a peft LoRA adapter as a GGUF LoRA adapter that llama.cpp (llama-cpp-python) loads on
top of the base GGUF.

Follows llama.cpp's ``convert_lora_to_gguf.py`` (written here with the ``gguf`` package directly, from
the trained peft model in memory, without a Hugging Face base-model folder):

- KV fields: ``general.architecture`` (copied from the base GGUF; llama.cpp refuses an adapter whose
  architecture differs from the model's), ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (float32). llama.cpp scales the update by ``alpha / rank`` (rank read from
  the tensors), the same as peft's ``lora_alpha / r``.
- Tensors: for each adapted projection, ``<base tensor name>.lora_a`` and ``.lora_b`` where the base
  tensor name is the base GGUF's (``blk.N.attn_q.weight``, ``blk.N.ffn_down.weight``...), mapped from
  the Hugging Face module name with gguf-py's ``TensorNameMap`` (the mapping llama.cpp's converters
  use). ``lora_a`` is peft's ``lora_A.weight`` as is (numpy ``[r, in_features]``, ggml ne
  ``[in, r]``) and ``lora_b`` peft's ``lora_B.weight`` (numpy ``[out_features, r]``, ggml ne
  ``[r, out]``); llama.cpp checks ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]`` and
  ``a.ne[1] == b.ne[0]``.
- Rotary permutation (the pitfall): llama-architecture GGUF files store the q and k projections with
  their rows permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs
  (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``: ``n_head`` heads for q, ``n_head_kv`` for
  k), and transformers' GGUF loader undoes it, so peft trains in the un-permuted layout. The rows of
  ``lora_b`` (the output side) of q and k get the same permutation here, as ``convert_lora_to_gguf``
  does through its ``LoraTorchTensor``; without it the adapter loads and changes the output, but
  the q/k part of the update lands on the wrong rotary dimensions.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

# GGUF architectures whose q/k rows are stored rotary-permuted (convert_hf_to_gguf's LlamaModel) and
# un-permuted by transformers' GGUF loader (its LlamaTensorProcessor); the adapter must match.
ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_LORA_MODULE = re.compile(r"(?:^|\.)(model\.layers\.\d+\.[\w.]+?)$")


class AdapterExportError(Exception):
    """The peft model cannot be written as a GGUF LoRA adapter for this base (unsupported
    architecture, module without a base tensor, shape mismatch, alpha mismatch, tied layers)."""


def rope_permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of ``weight`` (numpy ``[n_head * head_dim, ...]``, e.g. a q/k projection or its LoRA B)
    reordered as llama.cpp stores q and k: within each head, rows ``[0..d/2)`` and ``[d/2..d)``
    (Hugging Face's rotate-half halves) are interleaved into pairs. The same operation as
    ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py`` (pass ``n_head_kv`` for k).

    Raises ``ValueError`` when the row count is not a multiple of ``2 * n_head``.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _field_value(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


@functools.lru_cache(maxsize=4)
def _base_metadata(path: str, mtime_ns: int, size: int) -> tuple[str, int, int, int, dict[str, tuple[int, ...]]]:
    """``(architecture, block count, head count, kv head count, {tensor name: ggml ne})`` of a base
    GGUF. Cached per file version (``mtime_ns`` and ``size`` are part of the key): ``GGUFReader``
    parses every KV field up front, ~3 s for a 49,152-token vocabulary.

    Raises ``AdapterExportError`` for an architecture gguf-py does not know.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    architecture = _field_value(reader, "general.architecture")
    if architecture not in set(gguf.MODEL_ARCH_NAMES.values()):
        raise AdapterExportError(f"unknown base architecture {architecture!r}")
    n_blocks = int(_field_value(reader, f"{architecture}.block_count"))
    n_head = int(_field_value(reader, f"{architecture}.attention.head_count"))
    n_head_kv = int(_field_value(reader, f"{architecture}.attention.head_count_kv") or n_head)
    # ggml ne of each base tensor: [in_features, out_features] for a projection.
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}
    return architecture, n_blocks, n_head, n_head_kv, shapes


def _lora_modules(peft_model, adapter_name: str):
    """``(hf_module_name, lora_A weight [r, in], lora_B weight [out, r])`` for every LoRA layer of
    ``peft_model``, module names relative to the causal LM (``model.layers.0.self_attn.q_proj``)."""
    import torch

    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if lora_a is None or lora_b is None or adapter_name not in lora_a:
            continue
        match = _LORA_MODULE.search(name)
        if match is None:
            raise AdapterExportError(f"LoRA on {name!r}: only decoder-layer projections can be exported")
        a = lora_a[adapter_name].weight.detach().to("cpu", dtype=torch.float32).numpy()
        b = lora_b[adapter_name].weight.detach().to("cpu", dtype=torch.float32).numpy()
        yield match.group(1), a, b


def lora_adapter_export(
    peft_model,
    base_gguf_path: str | Path,
    output_path: str | Path,
    *,
    alpha: float | None = None,
    adapter_name: str = "default",
    _permute_qk: bool = True,
) -> Path:
    """Write ``peft_model``'s LoRA adapter as a GGUF LoRA adapter for ``base_gguf_path``; returns
    ``output_path``.

    ``peft_model``: a ``peft.PeftModel`` with plain LoRA (no rsLoRA, DoRA, rank or alpha patterns)
    on decoder-layer linear projections of a model loaded from ``base_gguf_path`` (see
    ``tuning.training``). ``alpha``: the LoRA alpha written to ``adapter.lora.alpha``; default the peft
    config's ``lora_alpha``. Tensors are float32 (an adapter of rank 16 on SmolLM2-135M's attention
    projections is 7.4 MB). The file is written to a temporary name next to ``output_path`` and
    renamed, so a failure never leaves a half-written adapter at ``output_path`` (the temporary file
    is removed; an existing file at ``output_path`` is replaced only on success).

    ``_permute_qk`` (testing only): ``False`` skips the rotary row permutation of q/k ``lora_b``,
    reproducing the silent half-working adapter the parity check must catch.

    Raises ``FileNotFoundError`` when the base GGUF is missing, ``AdapterExportError`` when ``alpha``
    differs from the peft config's, the peft config uses a variant llama.cpp cannot apply, a LoRA
    module has no matching base tensor, or shapes disagree with the base tensor's.
    """
    import gguf

    base_path = Path(base_gguf_path)
    if not base_path.is_file():
        raise FileNotFoundError(f"not a GGUF file: {base_path}")
    config = peft_model.peft_config[adapter_name]
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
        raise AdapterExportError("rsLoRA and DoRA adapters cannot be applied by llama.cpp's LoRA loader")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise AdapterExportError("per-module rank or alpha patterns are not supported")
    if alpha is None:
        alpha = float(config.lora_alpha)
    elif float(alpha) != float(config.lora_alpha):
        raise AdapterExportError(f"alpha {alpha} differs from the peft config's lora_alpha {config.lora_alpha}")

    stat = base_path.stat()
    architecture, n_blocks, n_head, n_head_kv, base_shapes = _base_metadata(
        str(base_path.resolve()), stat.st_mtime_ns, stat.st_size
    )
    arch_by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(arch_by_name[architecture], n_blocks)
    permuted = architecture in ROPE_PERMUTED_ARCHITECTURES

    tensors: list[tuple[str, np.ndarray]] = []
    for module_name, lora_a, lora_b in _lora_modules(peft_model, adapter_name):
        base_name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if base_name is None or base_name not in base_shapes:
            raise AdapterExportError(f"no base tensor for LoRA module {module_name!r} (mapped to {base_name!r})")
        in_features, out_features = base_shapes[base_name][:2]
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterExportError(
                f"{module_name}: lora_A {lora_a.shape} / lora_B {lora_b.shape} do not fit base tensor "
                f"{base_name} with ne {base_shapes[base_name]}"
            )
        if permuted and _permute_qk:
            if base_name.endswith(".attn_q.weight"):
                lora_b = rope_permute_rows(lora_b, n_head)
            elif base_name.endswith(".attn_k.weight"):
                lora_b = rope_permute_rows(lora_b, n_head_kv)
        tensors.append((base_name + ".lora_a", np.ascontiguousarray(lora_a, dtype=np.float32)))
        tensors.append((base_name + ".lora_b", np.ascontiguousarray(lora_b, dtype=np.float32)))
    if not tensors:
        raise AdapterExportError(f"the peft model has no LoRA layers for adapter {adapter_name!r}")

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, data in tensors:
        writer.add_tensor(name, data)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(output_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return output_path
