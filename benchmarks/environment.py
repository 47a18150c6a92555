"""What the benchmark scripts share: Django start-up, the data folder, and a header describing the
machine and the run (so a printed figure always says where it came from).

Not a benchmark itself; imported by the scripts of this folder (``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = "../shared/data/doc2dial/docs"


def django_setup() -> None:
    """Put the project root on ``sys.path``, default ``DJANGO_SETTINGS_MODULE`` to
    ``config.settings`` and run ``django.setup()`` (which starts the embedded servers if needed)."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import django

    django.setup()


def torch_threads(n: int) -> None:
    """Set torch's intra-op threads to ``n`` (0 = leave torch's default, as the product does)."""
    if n:
        import torch

        torch.set_num_threads(n)


def docs_folder(raw: str) -> Path:
    """The Doc2Dial ``docs`` folder: ``raw`` as given, relative paths resolved against the project
    root. Exits with a clear message (status 2) if it is missing or holds no ``.txt`` page."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (PROJECT_ROOT / path).resolve()
    if not path.is_dir() or not any(path.rglob("*.txt")):
        sys.exit(
            f"error: Doc2Dial docs folder not found or empty: {path}\n"
            f"       (expected ../shared/data/doc2dial/docs next to the project; pass --docs PATH)"
        )
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GB"
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.52 1.10 0.80"`` (other users share the cores)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def header(title: str, lines: list[tuple[str, str]]) -> str:
    """A block describing the machine, database, embedding model and run, followed by ``lines``."""
    import torch
    from django.conf import settings
    from django.db import connection

    from knowledge.embedding import model_id

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
        cursor.execute("SHOW shared_buffers")
        shared_buffers = cursor.fetchone()[0]
    db = settings.DATABASES["default"]
    where = "embedded server" if not os.environ.get("DATABASE_URL") else "DATABASE_URL"
    rows = [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("machine", f"{platform.node()}, {_cpu_model()}, {os.cpu_count()} logical cores, {_memory_gb()} RAM"),
        ("load average", f"{load_average()} (1/5/15 min, at start; the cores are shared)"),
        ("python / torch", f"{platform.python_version()} / torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"),
        ("database", f"PostgreSQL {pg_version}, pgvector {row[0] if row else 'missing'}, "
                     f"database {db['NAME']!r} ({where}), shared_buffers {shared_buffers}"),
        ("embedding model", f"{model_id()} on {settings.EMBEDDING_DEVICE}, batch {settings.EMBEDDING_BATCH_SIZE}, "
                            f"chunks <= {settings.CHUNK_MAX_TOKENS} tokens"),
        *lines,
    ]
    width = max(len(key) for key, _ in rows)
    bar = "=" * 100
    return "\n".join([bar, title, bar, *(f"{key:<{width}} : {value}" for key, value in rows), bar])


def progress(message: str) -> None:
    """Print a progress line to stderr with a timestamp (figures go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
