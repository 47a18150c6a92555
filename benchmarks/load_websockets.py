"""Load over websockets: N concurrent customers against the production process model, for a bounded
time, on loopback only (issue 13).

What runs (``Procfile.production``'s processes, with production settings: ``DEBUG`` off, no
``EMBEDDED_SERVICES``, explicit ``SECRET_KEY`` / ``DATABASE_URL`` / ``REDIS_URL`` / ``ALLOWED_HOSTS``,
``collectstatic`` into a temporary ``STATIC_ROOT``):

- a PostgreSQL + pgvector and a Redis server of the benchmark's own (``tests.dedicated_servers``:
  the machine's and the other runs' servers are never touched), database ``loadbench``, migrated;
- ``model``: ``manage.py serve_model`` (preloads the active GGUF; ``LLM_THREADS`` ``--threads``);
- ``web``: uvicorn with ``--web-workers`` worker processes, ``--ws websockets-sansio``, pointed at the
  model server (``LLM_SERVER_URL``), as the Procfile starts it;
- ``worker`` (Celery, concurrency 1) and ``beat``; the tuner is not started (no fine-tune runs in a
  customer soak). The worker ingests the demo knowledge base (``manage.py load_demo``) before the
  load, so answers are real: retrieved, generated or quoted (extractive), grounded and stored.

Each customer is a Python widget (``tests.faults.widget_client.WidgetClient``): ``POST
/api/conversations/`` from the site's origin, the websocket ``/ws/chat/<id>/`` authenticated by the
token as a subprotocol, then questions of ``benchmarks/data/demo_answerable.jsonl`` as ``chat.message``
frames, reading ``chat.token`` / ``chat.citations`` / ``chat.done`` / ``chat.busy`` /
``chat.rate_limited`` / ``chat.error`` frames. Like ``static/widget/widget.js``, a ``chat.busy`` or
``chat.rate_limited`` reply is answered by sending the same question again after its
``retry_after_s``. A customer thinks ``--think-s`` between questions and starts a new conversation after
``--questions-per-conversation``. When the level's ``--duration-s`` is over no new question is sent;
answers in flight get ``--drain-s`` more, then their sockets are closed and they are counted as cut
(neither completed nor errors).

Quote-first (``ANSWER_QUOTE_MIN_RELEVANCE``) stays on by default, as deployed: a demo question whose
source sentence is close enough is quoted without the model. ``--always-generate`` turns it off so the
model server writes every answer it can (the load on llama.cpp).

Rate limits: all customers come from 127.0.0.1 and one origin, where in production they would be N
addresses, so the web processes run with ``RATE_LIMIT_CONVERSATIONS_PER_IP`` and
``RATE_LIMIT_CONVERSATIONS_PER_ORIGIN`` raised to ``100000/minute`` (``--default-rate-limits`` keeps
them); ``RATE_LIMIT_QUESTIONS_PER_CONVERSATION`` keeps its default and the ``chat.rate_limited`` replies
are reported.

Per level: questions sent, completed answers (and how: ``generated`` by the model, ``extractive``
quote, ``declined``, ``curated``), ``chat.busy`` and ``chat.rate_limited`` replies, errors (``chat.error``,
``chat.agent_active``, a refused handshake or a dropped socket: must be 0), answers cut at the end,
time to first token (TTFT: from first sending the question, busy and rate-limited waits included, to
the first ``chat.token``, or to ``chat.done`` for an answer without tokens) p50/p95 and the p50's ratio
to N = 1 (the baseline level of the same run), the inbox page's latency for a logged-in agent
(``GET /dashboard/`` every ``--dashboard-interval-s``; idle before the level, then during it), the web
processes' RSS (uvicorn's parent and workers, summed) before and after, the peak of their threads and
of the database's connections, and the load average. The run fails (exit 1) on an error or when the
web processes' RSS grew by more than ``--rss-bound-mb`` (100 MB, summed over the web processes) over the
second half of a level's sending phase: the first half is the ramp to that N's high-water mark (threads,
malloc arenas, open sockets), after which a level at constant N must hold flat; the RSS before, at
mid-level, at the end of sending and after the drain is printed for every level. A longer
``--duration-s`` makes this the soak.

    python benchmarks/load_websockets.py                       # N = 1 (baseline), 10, 50; 60 s each
    python benchmarks/load_websockets.py --levels 1,10,50,100 --duration-s 600   # a longer soak

Measured with ``python benchmarks/load_websockets.py --levels 1,10,50,100`` (defaults otherwise: 60 s per
level + 30 s drain, 2 uvicorn workers, model server with 1 llama.cpp thread and 16 slots, SmolLM2-135M,
quote-first on) on the 2-core machine while other engineers' runs shared it: load average 3.43 at the
start, 2.66 / 3.34 / 4.61 / 5.84 at the end of each level::

    N    conv. asked completed (gen/extr/decl) busy  rate-ltd errors cut  TTFT p50  TTFT p95  p50/N=1  answers/min
    1      6    18   18 (1/17/0)                  0    0      0       0    183 ms   2089 ms   1.0x      16.4
    10    40   118  118 (4/114/0)                 0    0      0       0    458 ms  19956 ms   2.5x      91.9
    50    80   191  158 (0/154/4)                56    0      0      33   4143 ms  64178 ms  22.6x     103.4
    100  130   281  217 (0/209/8)               229    0      0      64   8381 ms  50325 ms  45.7x     140.5

    N    inbox idle p50   inbox under load p50/p95/max   web RSS MB before/mid/end/after   peak threads  peak DB conns
    1        74 ms          33 /  54 /  72 ms               1333 / 1390 / 1399 / 1400            22            4
    10       64 ms          59 / 152 / 243 ms               1400 / 1604 / 1633 / 1634            36           13
    50       84 ms         119 / 364 / 699 ms               1634 / 1886 / 1914 / 1932            73           50
    100      81 ms         244 / 373 / 405 ms               1932 / 2066 / 2091 / 2121            94           71

Errors 0 at every level. Web RSS (two workers summed) rises with N to that N's high-water mark (1333 MB
after warm-up, 2121 MB after N = 100) and then holds: +8, +29, +29, +25 MB over the second half of each
level, under the 100 MB bound. The cut answers (N = 50: 33, N = 100: 64) had no token yet when cut: they
were waiting for the model (``chat.busy`` from the model server's 16 slots + queue of 8, retried) or
prefilling. Most answers end ``extractive`` even at N = 1: a quote-first hit, or the model's text
failed the groundedness check and a source sentence was quoted instead, so the model server still
runs for many of them (hence the busy replies). The inbox stays under 0.7 s at N = 100. Peak database
connections, 71 at N = 100 with two web processes, stay under PostgreSQL's default 100
(``ANSWER_MAX_CONCURRENT`` 32 per process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.environment import django_setup, header, progress  # noqa: E402  (no Django import at import time)

QUESTIONS_FILE = ROOT / "benchmarks" / "data" / "demo_answerable.jsonl"
DATABASE = "loadbench"
RAISED_LIMIT = "100000/minute"
AGENT = ("loadbench-agent", secrets.token_urlsafe(12))


# --- one customer -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one level's customers saw, added to as frames arrive (so a cut answer's busy replies count).

    ``ttft_ms``: one entry per completed answer, milliseconds; ``methods``: ``chat.done``'s ``method``
    (``"declined"`` for abstentions) per completed answer; ``errors``: one description per error."""

    asked: int = 0
    completed: int = 0
    busy: int = 0
    rate_limited: int = 0
    cut: int = 0
    cut_before_first_token: int = 0
    conversations: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    methods: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


RETRY_FRAMES = ("chat.busy", "chat.rate_limited")
ERROR_FRAMES = ("chat.error", "chat.agent_active")


async def ask_timed(socket, text: str, tally: Tally, *, state: dict | None = None, clock=time.perf_counter,
                    sleep=asyncio.sleep) -> dict | None:
    """Send ``text`` as ``chat.message`` on ``socket`` (anything with ``send(str)`` and ``recv() -> str``)
    and read frames until the answer ends, as the widget does: after ``chat.busy`` or
    ``chat.rate_limited`` wait its ``retry_after_s`` (seconds) and send the same question again.

    Returns the ``chat.done`` frame with ``"ttft_ms"`` added (first send to the first ``chat.token``,
    or to ``chat.done`` when no token came), after adding it to ``tally``; ``None`` after a
    ``chat.error`` or ``chat.agent_active`` frame, which is added to ``tally.errors``. Other frames
    (``chat.citations``, ``chat.status``) are read and ignored. Exceptions of ``socket`` propagate.
    ``state`` (the caller's, read if this call is cancelled): ``"first_token"`` set to True once a
    ``chat.token`` arrived."""
    state = {} if state is None else state
    frame_out = json.dumps({"type": "chat.message", "text": text})
    sent = clock()
    first = None
    tally.asked += 1
    await socket.send(frame_out)
    while True:
        frame = json.loads(await socket.recv())
        kind = frame.get("type")
        if kind == "chat.token":
            if first is None:
                first = clock()
                state["first_token"] = True
        elif kind in RETRY_FRAMES:
            if kind == "chat.busy":
                tally.busy += 1
            else:
                tally.rate_limited += 1
            await sleep(float(frame["retry_after_s"]))
            await socket.send(frame_out)
        elif kind == "chat.done":
            ttft_ms = ((first if first is not None else clock()) - sent) * 1000
            tally.completed += 1
            tally.ttft_ms.append(ttft_ms)
            tally.methods["declined" if frame.get("abstained") else frame.get("method", "?")] += 1
            return {**frame, "ttft_ms": ttft_ms}
        elif kind in ERROR_FRAMES:
            tally.errors.append(f"{kind}: {frame.get('message', frame.get('code', ''))}")
            return None


async def customer(base_url: str, questions: list[str], offset: int, stop_at: float, cut_at: float, tally: Tally,
                   *, think_s: float, per_conversation: int) -> None:
    """One customer from now until ``stop_at`` (``time.monotonic()`` seconds): conversations of
    ``per_conversation`` questions (``questions`` in turn from ``offset``), ``think_s`` seconds apart.
    An answer still running at ``cut_at`` is abandoned (socket closed) and counted as cut."""
    from tests.faults.widget_client import WidgetClient

    asked = offset
    while time.monotonic() < stop_at:
        client = WidgetClient(base_url)
        try:
            response = await asyncio.to_thread(client.start)
            if response.status_code != 201:
                tally.errors.append(f"POST /api/conversations/ {response.status_code}")
                await asyncio.sleep(think_s)
                continue
            tally.conversations += 1
            await client.connect()
            for _ in range(per_conversation):
                if time.monotonic() >= stop_at:
                    break
                state: dict = {}
                try:
                    async with asyncio.timeout(max(0.0, cut_at - time.monotonic())):
                        await ask_timed(client.socket, questions[asked % len(questions)], tally, state=state)
                except TimeoutError:
                    tally.cut += 1
                    tally.cut_before_first_token += not state.get("first_token")
                    return
                asked += 1
                await asyncio.sleep(think_s)
        except Exception as error:  # refused handshake, dropped socket, HTTP failure: all errors
            tally.errors.append(f"{type(error).__name__}: {error}")
            await asyncio.sleep(think_s)
        finally:
            await client.close()


# --- the agent's dashboard ----------------------------------------------------------------------------


def agent_session(base_url: str, username: str, password: str):
    """A ``requests.Session`` logged in at ``/accounts/login/`` (Django's login form and its CSRF
    cookie). Raises ``RuntimeError`` when ``/dashboard/`` does not then answer 200."""
    import re

    import requests

    session = requests.Session()
    page = session.get(f"{base_url}/accounts/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    session.post(f"{base_url}/accounts/login/", timeout=30, headers={"Referer": f"{base_url}/accounts/login/"},
                 data={"username": username, "password": password, "csrfmiddlewaretoken": token})
    check = session.get(f"{base_url}/dashboard/", timeout=30, allow_redirects=False)
    if check.status_code != 200:
        raise RuntimeError(f"agent login failed: /dashboard/ answered {check.status_code}")
    return session


def inbox_load(session, base_url: str, out: list, failures: list) -> None:
    """``GET /dashboard/`` (the inbox) once: its latency in ms to ``out``, or its status (or the
    exception's name) to ``failures`` when it is not 200."""
    started = time.perf_counter()
    try:
        status = session.get(f"{base_url}/dashboard/", timeout=120).status_code
    except Exception as error:
        status = type(error).__name__
    if status == 200:
        out.append((time.perf_counter() - started) * 1000)
    else:
        failures.append(status)


def inbox_while(stop: threading.Event, session, base_url: str, interval_s: float, out: list, failures: list,
                samples: list, sample) -> None:
    """Until ``stop`` is set: ``inbox_load`` every ``interval_s`` seconds, and ``sample()``'s result
    appended to ``samples`` after each."""
    while not stop.is_set():
        inbox_load(session, base_url, out, failures)
        samples.append(sample())
        stop.wait(interval_s)


# --- the production processes --------------------------------------------------------------------------


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory (MB) of process ``pid`` and its descendants, summed."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 1e6


def process_tree_threads(pid: int) -> int:
    """Threads of process ``pid`` and its descendants, summed."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.num_threads() for p in [process, *process.children(recursive=True)])


class Deployment:
    """The processes of ``Procfile.production`` on loopback, with production settings, on the given
    database and Redis URLs; logs under ``folder``. ``start()`` returns once the web process's
    ``/readyz`` is 200 and the demo knowledge base is ingested; ``stop()`` ends what it started."""

    def __init__(self, folder: Path, database_url: str, redis_url: str, *, web_workers: int, threads: int,
                 raise_limits: bool, always_generate: bool):
        from tests.live_server import free_port

        self.folder = folder
        self.model_port, self.web_port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.web_port}"
        self.web_workers = web_workers
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DEBUG", "EMBEDDED_SERVICES", "DATABASE_NAME")},
            "DJANGO_SETTINGS_MODULE": "config.settings", "SECRET_KEY": secrets.token_urlsafe(50),
            "DATABASE_URL": database_url, "REDIS_URL": redis_url, "ALLOWED_HOSTS": "127.0.0.1,localhost",
            # Plain HTTP on loopback stands in for the TLS-terminating proxy of a deployment.
            "SECURE_SSL_REDIRECT": "false", "SESSION_COOKIE_SECURE": "false", "CSRF_COOKIE_SECURE": "false",
            "DATA_DIR": str(folder / "data"), "STATIC_ROOT": str(folder / "static"),
            "LLM_THREADS": str(threads), "LLM_SERVER_URL": f"http://127.0.0.1:{self.model_port}/v1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if always_generate:
            self.env["ANSWER_QUOTE_MIN_RELEVANCE"] = "2"
        if raise_limits:
            self.env["RATE_LIMIT_CONVERSATIONS_PER_IP"] = RAISED_LIMIT
            self.env["RATE_LIMIT_CONVERSATIONS_PER_ORIGIN"] = RAISED_LIMIT

    def manage(self, *arguments: str) -> str:
        """Run ``manage.py`` with the production environment; its output. Raises on failure."""
        done = subprocess.run([sys.executable, "manage.py", *arguments], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=600)
        if done.returncode:
            raise SystemExit(f"manage.py {' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def spawn(self, name: str, command: list[str]) -> None:
        self.processes[name] = subprocess.Popen(command, cwd=ROOT, env=self.env, start_new_session=True,
                                                stdout=open(self.folder / f"{name}.log", "wb"), stderr=subprocess.STDOUT)

    def wait_http(self, url: str, name: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become ready at {url}; log: {self.folder / (name + '.log')}")
            time.sleep(0.5)

    def start(self) -> None:
        self.manage("collectstatic", "--noinput", "-v", "0")
        self.spawn("model", [sys.executable, "manage.py", "serve_model", "--port", str(self.model_port)])
        self.spawn("worker", [sys.executable, "-m", "celery", "-A", "config", "worker", "--concurrency=1",
                              "--loglevel=INFO"])
        self.spawn("beat", [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel=INFO",
                            "--schedule", str(self.folder / "celerybeat-schedule")])
        self.manage("load_demo")
        self.wait_http(f"http://127.0.0.1:{self.model_port}/health", "model")
        self.spawn("web", [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                           "--port", str(self.web_port), "--workers", str(self.web_workers), "--ws",
                           "websockets-sansio", "--no-server-header", "--log-level", "warning"])
        # /readyz loads the embedding model of the worker that answers it; ask a few times so each
        # worker (the kernel spreads connections) is likely to have loaded it before the load.
        self.wait_http(f"{self.base_url}/readyz", "web")
        for _ in range(4 * self.web_workers):
            self.wait_http(f"{self.base_url}/readyz", "web")

    def stop(self) -> None:
        for name in ("web", "beat", "worker", "model"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def demo_ingested(timeout_s: float = 600) -> int:
    """Wait until every source of the demo knowledge base is ready (raises ``SystemExit`` if one
    failed or the wait times out); the number of chunks."""
    from knowledge.models import Chunk, Source

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = Counter(Source.objects.values_list("status", flat=True))
        if statuses and set(statuses) == {"ready"}:
            return Chunk.objects.count()
        if "failed" in statuses or time.monotonic() > deadline:
            raise SystemExit(f"the demo knowledge base did not ingest: {dict(statuses)}")
        time.sleep(1)


# --- one level -------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def level(deployment: Deployment, session, postgres, n: int, questions: list[str], args) -> dict:
    """Run ``n`` customers for ``args.duration_s`` (+ ``args.drain_s``) while timing the inbox; the figures."""
    web_pid = deployment.processes["web"].pid
    idle, idle_failures = [], []
    for _ in range(args.idle_probes):  # the inbox with nothing else running
        inbox_load(session, deployment.base_url, idle, idle_failures)
    rss_before = process_tree_rss_mb(web_pid)
    busy, failures, samples = [], [], []

    def sample():
        return (time.monotonic(), process_tree_threads(web_pid),
                postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}'")[0][0],
                process_tree_rss_mb(web_pid))

    stop = threading.Event()
    prober = threading.Thread(target=inbox_while, args=(stop, session, deployment.base_url, args.dashboard_interval_s,
                                                        busy, failures, samples, sample))
    tally = Tally()
    started = time.monotonic()
    stop_at, cut_at = started + args.duration_s, started + args.duration_s + args.drain_s
    prober.start()

    async def everyone():
        await asyncio.gather(*(customer(deployment.base_url, questions, i, stop_at, cut_at, tally, think_s=args.think_s,
                                        per_conversation=args.questions_per_conversation) for i in range(n)))

    asyncio.run(everyone())
    wall = time.monotonic() - started
    stop.set()
    prober.join()
    # The soak: RSS at the midpoint of the sending phase (the ramp to this N's high-water mark is over)
    # against RSS at its end; the drain, with fewer answers running, is left out.
    sending = [s for s in samples if s[0] <= stop_at]
    second_half = [s for s in sending if s[0] >= started + args.duration_s / 2] or sending[-1:]
    return {"n": n, "tally": tally, "wall_s": wall, "idle_ms": idle, "busy_ms": busy,
            "dashboard_failures": idle_failures + failures, "rss_before": rss_before,
            "rss_mid": second_half[0][3] if second_half else None, "rss_end": second_half[-1][3] if second_half else None,
            "rss_after": process_tree_rss_mb(web_pid), "peak_threads": max((s[1] for s in samples), default=None),
            "peak_connections": max((s[2] for s in samples), default=None), "load": os.getloadavg()[0]}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _rss(row: dict) -> str:
    return " / ".join(_ms(row[key]) for key in ("rss_before", "rss_mid", "rss_end", "rss_after"))


def soak_growth_mb(row: dict) -> float:
    """How much the web processes' RSS grew over the second half of a level's sending phase (MB)."""
    return (row["rss_end"] - row["rss_mid"]) if row["rss_mid"] is not None else 0.0


def report(rows: list[dict]) -> None:
    print("| N | conversations | questions sent | completed (method: generated / extractive / declined / curated) | busy replies "
          "| rate-limited replies | errors | cut at the end | TTFT p50 ms | TTFT p95 ms | TTFT p50 / N=1 "
          "| answers/min | inbox ms idle p50 | inbox ms under load p50 / p95 / max | web RSS MB before / mid / end of sending "
          "/ after | peak web threads | peak DB connections | load (1 min) |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    base = None
    for row in rows:
        t: Tally = row["tally"]
        p50 = percentile(t.ttft_ms, 50)
        base = base if base is not None else p50
        m = t.methods
        load_ms = row["busy_ms"]
        print(f"| {row['n']} | {t.conversations} | {t.asked} | {t.completed} ({m['generated']} / {m['extractive']} / "
              f"{m['declined']} / {m['curated']}) | {t.busy} | {t.rate_limited} | {len(t.errors)} "
              f"| {t.cut} ({t.cut_before_first_token} before a token) | {_ms(p50)} | {_ms(percentile(t.ttft_ms, 95))} "
              f"| {p50 / base:.1f}x | {t.completed / row['wall_s'] * 60:.1f} | {_ms(percentile(row['idle_ms'], 50))} "
              f"| {_ms(percentile(load_ms, 50))} / {_ms(percentile(load_ms, 95))} / {_ms(max(load_ms, default=None))} "
              f"({len(load_ms)} loads) | {_rss(row)} | {row['peak_threads']} "
              f"| {row['peak_connections']} | {row['load']:.2f} |"
              if p50 is not None and base else
              f"| {row['n']} | {t.conversations} | {t.asked} | {t.completed} | {t.busy} | {t.rate_limited} "
              f"| {len(t.errors)} | {t.cut} | - | - | - | - | - | - | {_rss(row)} "
              f"| {row['peak_threads']} | {row['peak_connections']} | {row['load']:.2f} |")
    for row in rows:
        for error in Counter(row["tally"].errors).most_common():
            print(f"  N = {row['n']} error x{error[1]}: {error[0]}")
        if row["dashboard_failures"]:
            print(f"  N = {row['n']} inbox failures: {Counter(row['dashboard_failures'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,10,50", help="concurrent customers per level; the first is the baseline")
    parser.add_argument("--duration-s", type=float, default=60, help="seconds each level sends questions")
    parser.add_argument("--drain-s", type=float, default=30, help="seconds answers in flight may still finish")
    parser.add_argument("--think-s", type=float, default=3, help="a customer's pause after each answer")
    parser.add_argument("--questions-per-conversation", type=int, default=3)
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes (WEB_CONCURRENCY)")
    parser.add_argument("--threads", type=int, default=1, help="the model server's LLM_THREADS")
    parser.add_argument("--dashboard-interval-s", type=float, default=2, help="pause between inbox loads")
    parser.add_argument("--idle-probes", type=int, default=5, help="inbox loads before each level, with no load")
    parser.add_argument("--rss-bound-mb", type=float, default=100,
                        help="most the web processes' RSS (summed) may grow over the second half of a level's sending "
                             "phase, once that N's concurrency has been reached")
    parser.add_argument("--always-generate", action="store_true",
                        help="quote-first off (ANSWER_QUOTE_MIN_RELEVANCE=2): the model writes every answer it can")
    parser.add_argument("--default-rate-limits", action="store_true",
                        help="keep the conversation-creation limits (all customers share one IP and origin)")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",") if n]

    from tests.dedicated_servers import dedicated_postgres, dedicated_redis

    folder = Path(tempfile.mkdtemp(prefix="loadbench-"))
    # Redis first: dedicated_postgres's `manage.py migrate` inherits this environment, and without
    # REDIS_URL its settings would start an embedded Redis in the project's .data that outlives the run.
    with dedicated_redis() as redis_server:
        os.environ.update({"REDIS_URL": redis_server.url, "EMBEDDED_SERVICES": "1", "DATA_DIR": str(folder / "data")})
        os.environ.pop("DATABASE_NAME", None)
        with dedicated_postgres(DATABASE) as postgres:
            # This process is a client reading the same database (header, agent login, ingestion state).
            os.environ["DATABASE_URL"] = postgres.database_url
            failed = run(args, levels, folder, postgres, redis_server)
    sys.exit(1 if failed else 0)


def run(args, levels: list[int], folder: Path, postgres, redis_server) -> bool:
    """Start the deployment, run the levels, print the figures; whether the run failed (an error, or
    RSS growth past the bound). Stops the deployment whatever happens."""
    django_setup()
    deployment = Deployment(folder, postgres.database_url, redis_server.url, web_workers=args.web_workers,
                            threads=args.threads, raise_limits=not args.default_rate_limits,
                            always_generate=args.always_generate)
    try:
        progress(f"starting the production processes (logs in {folder})")
        deployment.start()
        chunks = demo_ingested()
        from django.conf import settings
        from django.contrib.auth import get_user_model

        get_user_model().objects.create_user(AGENT[0], password=AGENT[1], is_staff=True)
        session = agent_session(deployment.base_url, *AGENT)
        questions = [json.loads(line)["question"] for line in QUESTIONS_FILE.read_text().splitlines() if line.strip()]
        print(header("Load over websockets: N concurrent customers against the production process model", [
            ("processes", f"model server (LLM_THREADS {args.threads}, {settings.MODEL_SERVER_SLOTS} slots, queue "
                          f"{settings.LLM_QUEUE_SIZE}), uvicorn x {args.web_workers} (ANSWER_MAX_CONCURRENT "
                          f"{settings.ANSWER_MAX_CONCURRENT} each), celery worker x 1, beat; DEBUG off"),
            ("knowledge base", f"demo store (manage.py load_demo, ingested by the worker): {chunks} chunks"),
            ("customers", f"{len(questions)} questions of {QUESTIONS_FILE.name} in turn, {args.questions_per_conversation}"
                          f" per conversation, {args.think_s:g} s think time; {args.duration_s:g} s per level "
                          f"+ {args.drain_s:g} s drain"),
            ("rate limits", "defaults" if args.default_rate_limits
             else f"conversations per IP and per origin raised to {RAISED_LIMIT} (one IP, one origin here)"),
            ("quote-first", "off (--always-generate: ANSWER_QUOTE_MIN_RELEVANCE=2)" if args.always_generate
             else f"on (ANSWER_QUOTE_MIN_RELEVANCE {settings.ANSWER_QUOTE_MIN_RELEVANCE}, the default)"),
            ("questions/conversation", settings.RATE_LIMIT_QUESTIONS_PER_CONVERSATION + " (default, replies reported)"),
        ]))
        # Warm-up: one answer, so the first level's TTFT is not the first retrieval's.
        asyncio.run(customer(deployment.base_url, questions, 0, time.monotonic() + 0.1, time.monotonic() + 120,
                             Tally(), think_s=0, per_conversation=1))
        rss_start = process_tree_rss_mb(deployment.processes["web"].pid)
        rows = []
        for n in levels:
            progress(f"N = {n}: {args.duration_s:g} s")
            rows.append(level(deployment, session, postgres, n, questions, args))
        rss_end = process_tree_rss_mb(deployment.processes["web"].pid)
        print()
        report(rows)
        growth = max(soak_growth_mb(row) for row in rows)
        per_level = ", ".join(f"{row['n']}: {soak_growth_mb(row):+.0f}" for row in rows)
        errors = sum(len(row["tally"].errors) for row in rows)
        print(f"\nweb processes' RSS: {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB after the last level "
              f"(the high-water mark of the highest N); growth over the second half of a level's sending "
              f"phase, at most {growth:+.0f} MB (N = "
              f"{per_level}); bound {args.rss_bound_mb:g} MB: "
              f"{'held' if growth <= args.rss_bound_mb else 'EXCEEDED'}")
        print(f"errors: {errors} (must be 0); load average at the end {os.getloadavg()[0]:.2f} "
              f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        failed = errors or growth > args.rss_bound_mb
    finally:
        deployment.stop()
        # Keep the processes' logs; the collected static files and the data folder are copies.
        shutil.rmtree(folder / "static", ignore_errors=True)
        shutil.rmtree(folder / "data", ignore_errors=True)
    return bool(failed)


if __name__ == "__main__":
    main()
