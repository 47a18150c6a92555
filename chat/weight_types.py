"""The weight type a GGUF is served in: as shipped, or converted once to one that llama.cpp's CPU
backend multiplies in batches.

Continuous batching (``chat.batching``) only pays when a step over 16 sequences costs much less than
16 one-sequence steps, which needs a batched matrix-product kernel for the weights' type. llama.cpp's
CPU backend has one for Q8_0, Q4_0, F16 and BF16 (llamafile's tinyBLAS, repacked layouts) but not for
Q4_1, the type of the packaged SmolLM2-135M-Instruct: there a 16-token step costs nearly what 16
single steps do. Measured here on 2 cores (``benchmarks/chat_throughput.py --scheduler-levels 1,16``,
README "Model server"): the scheduler decodes 16 streams at 1.46x one stream with the Q4_1 file and
at 2.05x with the same weights requantized to Q8_0, whose single stream is as fast (and 145 MB on disk
instead of 92 MB). Q8_0 holds Q4_1's values almost exactly: teacher-forced on real answers, the mean
KL divergence from the Q4_1 model's next-token distribution is 0.006 (F16: 0.003, arithmetic noise),
top-1 agreement 0.958 (F16: 0.967); Q4_0 was also fast but lossy (KL 0.31, agreement 0.69), so it is
not offered.

``LLM_WEIGHT_TYPE``:

- ``auto`` (default): Q4_1 files are served as Q8_0 when no layer is offloaded to a GPU
  (``LLM_GPU_LAYERS`` 0); anything else as shipped (a Q4_K_M 7B model would only grow);
- ``none``: every file as shipped;
- ``q8_0`` or ``f16``: every file not already of that type is converted to it.

A conversion (``llama_model_quantize`` with requantization allowed; about a second for 135M
parameters, minutes for 7B) is written once per host to ``MODEL_CACHE_DIR/<sha256 of the source>/
<stem>.<type>.gguf`` (a temporary file per process and thread, renamed into place, so a crashed or
concurrent conversion never leaves a half file) and reused while the source's digest is the same. The source file is what a
model version records and verifies (``chat.engine.model_files_verify``); LoRA adapters apply on top of
either. Every serving loader asks here (``chat.engine.load_llama``, ``chat.batching.BatchModel``), so
the tuner's evaluation of a candidate sees what customers get; the adapter parity check
(``tuning.parity``) compares against the source file on purpose: it checks the export, not serving.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import Counter
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)

# Target types offered, by setting value: llama.cpp's file type constant name and ggml's tensor type name.
CONVERTIBLE = {"q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"), "f16": ("LLAMA_FTYPE_MOSTLY_F16", "F16")}
# Under ``auto``: the weight types converted, and to what (only Q4_1 was measured; see the docstring).
AUTO_CONVERSIONS = {"Q4_1": "q8_0"}


class WeightTypeError(ValueError):
    """``LLM_WEIGHT_TYPE`` holds a value other than ``auto``, ``none`` or a key of ``CONVERTIBLE``."""


def gguf_weight_type(path: str | Path) -> str:
    """The ggml type holding most weight parameters of the GGUF at ``path`` (e.g. ``"Q4_1"``), read from
    its tensor table with the ``gguf`` package (memory-mapped, no weights read). Raises ``OSError``
    when unreadable and ``ValueError`` when not a GGUF."""
    import gguf

    counts: Counter[str] = Counter()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if len(tensor.shape) >= 2:  # matrices; norms and biases are F32 in every type
            counts[tensor.tensor_type.name] += int(tensor.n_elements)
    if not counts:
        raise ValueError(f"{path} holds no weight matrices")
    return counts.most_common(1)[0][0]


def serving_weight_type(path: str | Path) -> str | None:
    """The ``CONVERTIBLE`` key the file at ``path`` is served in, or ``None`` for as shipped, by
    ``LLM_WEIGHT_TYPE`` (module docstring) and ``LLM_GPU_LAYERS``. Raises ``WeightTypeError`` for an
    unknown setting value, ``OSError``/``ValueError`` when the file's type cannot be read."""
    value = str(settings.LLM_WEIGHT_TYPE).strip().lower()
    if value == "none":
        return None
    if value not in CONVERTIBLE and value != "auto":
        raise WeightTypeError(f"LLM_WEIGHT_TYPE must be auto, none or one of {', '.join(CONVERTIBLE)}, not {value!r}")
    current = gguf_weight_type(path)
    if value == "auto":
        return AUTO_CONVERSIONS.get(current) if not settings.LLM_GPU_LAYERS else None
    return None if current == CONVERTIBLE[value][1] else value


def converted_path(path: str | Path, sha256: str, weight_type: str) -> Path:
    """Where the conversion of the file at ``path`` (digest ``sha256``) to ``weight_type`` is cached."""
    return Path(settings.MODEL_CACHE_DIR) / sha256 / f"{Path(path).stem}.{weight_type}.gguf"


def serving_model_path(path: str | Path, sha256: str = "") -> str:
    """The GGUF to load for the base model file at ``path``: ``path`` itself, or its conversion to the
    serving weight type (made now when not cached; ``sha256`` is the source's digest, computed when
    not given). A conversion that fails is logged and the file is served as shipped; a bad
    ``LLM_WEIGHT_TYPE`` raises ``WeightTypeError``."""
    import llama_cpp

    try:
        weight_type = serving_weight_type(path)
    except (OSError, ValueError) as error:
        if isinstance(error, WeightTypeError):
            raise
        logger.warning("serving %s as shipped: its weight type could not be read (%s)", path, error)
        return str(path)
    if weight_type is None:
        return str(path)
    if not sha256:
        from chat.model_files import file_sha256

        sha256 = file_sha256(path)
    target = converted_path(path, sha256, weight_type)
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, CONVERTIBLE[weight_type][0])
    params.allow_requantize = True
    params.nthread = max(1, settings.LLM_THREADS)
    try:
        status = llama_cpp.llama_model_quantize(str(path).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize returned {status}")
        os.replace(partial, target)
    except (OSError, RuntimeError) as error:
        logger.warning("serving %s as shipped: converting it to %s failed (%s)", path, weight_type, error)
        partial.unlink(missing_ok=True)
        return str(path)
    logger.info("converted %s to %s for serving: %s", path, weight_type, target)
    return str(target)
