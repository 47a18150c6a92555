"""Where llama.cpp keeps a model's weights on the CPU: its plain buffers, or also its "extra" buffer
types (weights repacked into interleaved layouts for AVX2/AVX-512/NEON kernels, and Intel AMX tiles).

llama-cpp-python 0.3.36 built on a CPU that reports AMX puts a Q4_1 model's weights in the AMX buffer
type, and there every decode crashed with a general protection fault inside ``libggml-cpu`` (seen on
a 2-core Xeon with ``amx_tile`` in ``/proc/cpuinfo``: the bare ``Llama`` crashed on its first
``create_chat_completion``, base model or LoRA adapter alike; with the extra buffer types off both
answered). llama.cpp has a model parameter for it (``use_extra_bufts``, llama-server's ``--no-repack``)
but no environment switch, and llama-cpp-python's ``Llama`` takes no argument for it, so every place
that loads a model asks here: ``LLM_CPU_EXTRA_BUFFERS`` ``on``, ``off`` or ``auto`` (default: off on a
CPU that reports AMX, on elsewhere; repacking has no layout for Q4_1, so it costs that model nothing).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from django.conf import settings

_LOADING = threading.Lock()


@lru_cache(maxsize=1)
def _cpu_reports_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: nothing to read, nothing known to crash
        return False


def cpu_extra_buffers() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (``LLM_CPU_EXTRA_BUFFERS``, see the module
    docstring). Raises ``ValueError`` for a value other than ``on``, ``off`` and ``auto``."""
    value = str(settings.LLM_CPU_EXTRA_BUFFERS).strip().lower()
    if value not in {"on", "off", "auto"}:
        raise ValueError(f"LLM_CPU_EXTRA_BUFFERS must be on, off or auto, not {value!r}")
    return value == "on" or (value == "auto" and not _cpu_reports_amx())


def model_params_apply(params) -> None:
    """Set ``params`` (a ``llama_cpp.llama_model_params``) for the low-level loader."""
    params.use_extra_bufts = cpu_extra_buffers()


@contextmanager
def llama_loading() -> Iterator[None]:
    """Wrap the construction of a high-level ``llama_cpp.Llama``: while it loads, llama-cpp-python's
    default model parameters carry ``cpu_extra_buffers()`` (one load at a time in this process)."""
    import llama_cpp.llama_cpp as low_level

    with _LOADING:
        defaults = low_level.llama_model_default_params

        def patched():
            params = defaults()
            model_params_apply(params)
            return params

        low_level.llama_model_default_params = patched
        try:
            yield
        finally:
            low_level.llama_model_default_params = defaults
