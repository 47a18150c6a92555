"""Model files on disk: their SHA-256 digests, cached per (path, size, mtime).

A model version records the digests of its base GGUF and LoRA adapter GGUF when it is registered;
the engine checks them again before it loads the files (``chat.engine.model_files_verify``). Hashing
SmolLM2-135M Q4_1 (~100 MB) takes a fraction of a second, a 7B model several seconds, so a file is
read once per process: later checks cost one ``stat``, and a file replaced in place (new size or
modification time) is hashed again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

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
