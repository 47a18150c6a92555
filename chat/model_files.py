"""Model files on disk: their SHA-256 digests, cached per (path, size, mtime).

A model version records the digests of its base GGUF and LoRA adapter GGUF when it is registered;
the engine checks them again before it loads the files (``chat.engine.model_files_verify``). Hashing
SmolLM2-135M Q4_1 (~100 MB) takes a fraction of a second, a 7B model several seconds, so a file is
read once per process: later checks cost one ``stat``, and a file replaced in place (new size or
modification time) is hashed again.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# GGUF format versions llama.cpp reads (version 1 was dropped in 2023).
GGUF_VERSIONS = frozenset({2, 3})

_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path`` (cached per path, size and modification time in
    nanoseconds). Raises ``FileNotFoundError``."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    with _lock:
        _cache[key] = digest.hexdigest()
    return _cache[key]


def file_sha256_remember(path: str | Path, sha256: str) -> None:
    """Record that the file at ``path`` (as it is now: size, modification time) has digest ``sha256``,
    computed while it was written (``chat.model_artifacts`` hashes a download on the way), so the
    next ``file_sha256`` does not read it again. Raises ``FileNotFoundError``."""
    stat = Path(path).stat()
    with _lock:
        _cache[(str(path), stat.st_size, stat.st_mtime_ns)] = sha256


def gguf_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a GGUF model llama.cpp loads, or ``None`` when its header is fine: not
    set, not a file (``"model file not found: <path>"``), unreadable, not starting with the GGUF magic
    (``"not a GGUF file: <path>"``, e.g. an HTML error page saved as the model), or a format version
    outside ``GGUF_VERSIONS`` (uint32, little-endian, right after the magic). Reads 8 bytes; a file
    truncated after its header is only found when it is loaded."""
    if not path:
        return "no model path configured (LLM_MODEL_PATH)"
    file = Path(path)
    if not file.is_file():
        return f"model file not found: {path}"
    try:
        with open(file, "rb") as handle:
            header = handle.read(8)
    except OSError as error:
        return f"model file not readable: {path}: {error.strerror}"
    if len(header) < 8 or header[:4] != GGUF_MAGIC:
        return f"not a GGUF file: {path}"
    version = struct.unpack("<I", header[4:])[0]
    if version not in GGUF_VERSIONS:
        return f"unsupported GGUF version {version}: {path}"
    return None
