"""Chat throughput: the answer pipeline over the websocket against bare llama-cpp-python, and N
concurrent websocket conversations.

Part 1 (same prompts): for each of ``--prompts`` first-turn questions that the pipeline answers (not
abstained), the grounded prompt is built exactly as the pipeline builds it (same retrieval, same
sources) and run

- bare: ``llama_cpp.Llama.create_chat_completion(stream=True)`` on a separately loaded copy of the
  active model (same settings), timing prompt evaluation (start to first token) and decode tokens/s;
- pipeline: the question sent over the websocket (``/ws/chat/<id>/`` with the token as a subprotocol, Channels'
  ``WebsocketCommunicator`` on ``config.asgi.application``), timing TTFT at the client (frame sent to
  first ``chat.token`` frame) and the client-side token rate (the server's token count over first to
  last ``chat.token`` frame).

Runs alternate (bare, pipeline, bare, ...) so both see the same machine load; greedy decoding makes
the two texts equal when the prompts are (reported as a check).

Part 2: N = 1, 4, 16 conversations ask at the same moment over their own sockets. A ``chat.busy``
reply is retried after its ``retry_after_s``, as the widget does. Reports completed, errors, busy
replies, TTFT p50/p95 (first send to first token, including any busy wait) and aggregate tokens/s
(all answers' tokens over the wall time).

    DATABASE_NAME=chatdev python benchmarks/chat_throughput.py \
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial

``--process-model server`` (the production process model, Procfile.production): the benchmark starts
the model server (``manage.py serve_model``, ``MODEL_SERVER_SLOTS`` sequences, ``--threads``) and a web
process (uvicorn, ``--web-workers``, ``LLM_SERVER_URL`` pointing at the model server) as subprocesses;
part 1 then compares bare llama-cpp-python with the same prompts sent by the model client to the
model server (single stream: the scheduler, HTTP and SSE against a bare ``Llama``), part 2 sends
every conversation over a real websocket to the web process, and reports the resident memory (RSS)
of the web processes and of the model server. ``--always-generate`` (default) turns quote-first off
in the web process (``ANSWER_QUOTE_MIN_RELEVANCE=2``) so every answered question is decoded by the
model. Beside TTFT it prints the serial-prefill bound: a CPU prefills one prompt at a time at best,
so with N prompts arriving together the median customer waits about (N + 1) / 2 single-stream TTFTs.
``--process-model inprocess`` is the previous model (the engine inside the benchmark's process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from channels.testing import WebsocketCommunicator  # noqa: E402
from django.conf import settings  # noqa: E402

from chat import services  # noqa: E402
from chat.conversation_access import client_subprotocols  # noqa: E402
from chat.engine import load_llama  # noqa: E402
from chat.models import Conversation  # noqa: E402
from chat.prompts import grounded_messages  # noqa: E402
from config.asgi import application  # noqa: E402
from knowledge.evaluation import load_questions, percentile  # noqa: E402
from knowledge.selectors import chunk_search, retrieval_query  # noqa: E402

TIMEOUT_S = 600


def bare_run(llama, messages) -> dict:
    """One bare streamed completion: prompt evaluation ms (start to first token), tokens, decode tok/s."""
    started = time.perf_counter()
    first = last = None
    pieces = []
    for chunk in llama.create_chat_completion(messages, stream=True, max_tokens=settings.LLM_MAX_TOKENS,
                                              temperature=settings.LLM_TEMPERATURE,
                                              repeat_penalty=settings.LLM_REPEAT_PENALTY):
        text = chunk["choices"][0].get("delta", {}).get("content")
        if text:
            last = time.perf_counter()
            first = first or last
            pieces.append(text)
    tokens = len(pieces)
    return {
        "ttft_ms": (first - started) * 1000 if first else None,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0,
        "text": "".join(pieces),
    }


# The decode-bound prompt of the streams table: short, so prefill does not hide the decode rate.
SHORT_PROMPT = "Write a long story about a hiking trip in the mountains."
WEB_URL: str | None = None  # ws://host:port of the web process (--process-model server); None: in process


class _Socket:
    """A real websocket to the web process, with ``WebsocketCommunicator``'s calls."""

    def __init__(self, url: str, subprotocols: list[str]):
        self.url = url
        self.subprotocols = subprotocols
        self.connection = None

    async def connect(self, timeout: float):
        from websockets.asyncio.client import connect

        try:
            self.connection = await connect(self.url, open_timeout=timeout, max_size=None,
                                            subprotocols=self.subprotocols)
        except Exception as error:  # refused handshake or unreachable: reported as an error
            return False, error
        return True, None

    async def send_to(self, *, text_data: str):
        await self.connection.send(text_data)

    async def receive_from(self, timeout: float):
        return await asyncio.wait_for(self.connection.recv(), timeout)

    async def disconnect(self):
        if self.connection is not None:
            await self.connection.close()


async def ask(question: str, collection: str) -> dict:
    """Ask ``question`` in a new conversation over the websocket; retries ``chat.busy`` replies.

    Returns ``{"ttft_ms", "tokens", "client_tokens_per_s", "server", "busy", "error", "text"}``.
    """
    conversation = await sync_to_async(services.conversation_start)(collection=collection, origin="benchmark")
    path = f"/ws/chat/{conversation.pk}/"
    protocols = client_subprotocols(conversation.token)
    communicator = (_Socket(WEB_URL + path, protocols) if WEB_URL
                    else WebsocketCommunicator(application, path, subprotocols=protocols))
    connected, _ = await communicator.connect(timeout=30)
    result = {"busy": 0, "error": None, "ttft_ms": None, "tokens": 0, "client_tokens_per_s": 0.0, "text": ""}
    if not connected:
        result["error"] = "handshake refused"
        return result
    first_send = time.perf_counter()
    try:
        while True:
            await communicator.send_to(text_data=json.dumps({"type": "chat.message", "text": question}))
            first = last = None
            texts = []
            while True:
                frame = json.loads(await communicator.receive_from(timeout=TIMEOUT_S))
                if frame["type"] == "chat.token":
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        result["ttft_ms"] = (first - first_send) * 1000
                    texts.append(frame["text"])
                elif frame["type"] in ("chat.done", "chat.busy", "chat.error", "chat.agent_active"):
                    break
            if frame["type"] == "chat.busy":
                result["busy"] += 1
                await asyncio.sleep(frame["retry_after_s"])
                continue
            if frame["type"] != "chat.done":
                result["error"] = frame.get("message", frame["type"])
                return result
            result["server"] = frame["timings"]
            result["abstained"] = frame["abstained"]
            result["tokens"] = frame["timings"]["tokens"]
            result["text"] = frame["text"]
            span = (last - first) if first is not None and last is not None else 0
            result["client_tokens_per_s"] = (result["tokens"] - 1) / span if result["tokens"] > 1 and span > 0 else 0.0
            return result
    finally:
        await communicator.disconnect()


def same_prompts(questions, collection, count, llama, repeats) -> None:
    print(f"## Pipeline over the websocket vs bare llama-cpp-python (same prompts, max_tokens={settings.LLM_MAX_TOKENS}, "
          f"{repeats} runs each, alternating which goes first; per question the median)\n")
    chosen = []
    for question in questions:
        if len(chosen) >= count:
            break
        chunks = chunk_search(retrieval_query(question.question), k=settings.RETRIEVAL_K, collection=collection)
        if not services.should_abstain(chunks):
            chosen.append((question, grounded_messages(question.question, chunks[: settings.LLM_PROMPT_SOURCES],
                                                       max_chars=settings.LLM_SOURCE_MAX_CHARS)))
    # Questions inner, runs outer: consecutive prompts differ, so neither side reuses a whole prompt
    # from llama.cpp's prefix cache (both share only the chat template's opening).
    pairs_of: dict[str, list] = {question.qid: [] for question, _ in chosen}
    for run in range(repeats):
        for question, messages in chosen:
            if run % 2 == 0:
                bare = bare_run(llama, messages)
                pipeline = asyncio.run(ask(question.question, collection))
            else:
                pipeline = asyncio.run(ask(question.question, collection))
                bare = bare_run(llama, messages)
            if pipeline["error"] or pipeline.get("abstained"):
                print(f"{question.qid}: {pipeline['error'] or 'abstained'}")
                continue
            pairs_of[question.qid].append((bare, pipeline))
    rows = [(question, pairs_of[question.qid]) for question, _ in chosen if pairs_of[question.qid]]
    if not rows:
        print("no answered questions")
        return
    print("| question | tokens | bare prompt eval ms | retrieval ms | bare + retrieval ms "
          "| pipeline TTFT ms (client) | bare tok/s | pipeline tok/s (client) | rate ratio | same text |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
    ratios, ttft_pairs = [], []
    med = statistics.median
    for question, pairs in rows:
        for bare, pipeline in pairs:
            if bare["tokens_per_s"] and pipeline["client_tokens_per_s"]:
                ratios.append(pipeline["client_tokens_per_s"] / bare["tokens_per_s"])
            ttft_pairs.append((bare["ttft_ms"] + pipeline["server"]["retrieval_ms"], pipeline["ttft_ms"]))
        bare_eval = med(b["ttft_ms"] for b, _ in pairs)
        retrieval = med(p["server"]["retrieval_ms"] for _, p in pairs)
        bare_plus = med(b["ttft_ms"] + p["server"]["retrieval_ms"] for b, p in pairs)
        bare_rate = med(b["tokens_per_s"] for b, _ in pairs)
        pipe_rate = med(p["client_tokens_per_s"] for _, p in pairs)
        same = all(b["text"].strip() == p["text"] or p["text"].startswith(b["text"].strip()) for b, p in pairs)
        print(f"| {question.qid[:12]} | {pairs[0][0]['tokens']} | {bare_eval:.0f} | {retrieval:.0f} | {bare_plus:.0f} "
              f"| {med(p['ttft_ms'] for _, p in pairs):.0f} | {bare_rate:.1f} | {pipe_rate:.1f} "
              f"| {pipe_rate / bare_rate:.3f} | {'yes' if same else 'no'} |")
    all_bare = [b["tokens_per_s"] for _, pairs in rows for b, _ in pairs]
    all_pipe = [p["client_tokens_per_s"] for _, pairs in rows for _, p in pairs]
    print(f"\ndecode rate, median over {len(all_bare)} runs: bare {med(all_bare):.1f} tok/s, pipeline over the websocket "
          f"{med(all_pipe):.1f} tok/s; ratio of medians {med(all_pipe) / med(all_bare):.3f}, "
          f"median of paired ratios {med(ratios):.3f}")
    print(f"TTFT, median: bare prompt evaluation + retrieval {med(t[0] for t in ttft_pairs):.0f} ms, pipeline over the "
          f"websocket {med(t[1] for t in ttft_pairs):.0f} ms (median paired overhead "
          f"{med(t[1] - t[0] for t in ttft_pairs):+.0f} ms)\n")


def rss_mb(pid: int) -> float:
    """Resident memory (MB) of process ``pid`` and its children."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 1e6


def concurrent(questions, collection, levels, processes: dict | None = None) -> None:
    print("## Concurrent websocket conversations\n")
    print(f"(engine queue LLM_QUEUE_SIZE={settings.LLM_QUEUE_SIZE}; busy replies are retried after retry_after_s; "
          "serial-prefill bound: (N + 1) / 2 x the N = 1 TTFT p50)\n")
    print("| N | completed | errors | busy replies | TTFT p50 ms | serial-prefill bound p50 ms | TTFT p95 ms "
          "| aggregate tok/s | ratio to N = 1 | wall s |" + "".join(f" RSS {name} MB |" for name in processes or {}))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(processes or {}))
    base_rate = base_ttft = None
    for n in levels:
        asked = [questions[i % len(questions)].question for i in range(n)]

        async def run_all():
            return await asyncio.gather(*(ask(q, collection) for q in asked), return_exceptions=True)

        started = time.perf_counter()
        results = asyncio.run(run_all())
        wall = time.perf_counter() - started
        done = [r for r in results if isinstance(r, dict) and not r["error"]]
        errors = len(results) - len(done)
        ttfts = [r["ttft_ms"] for r in done if r["ttft_ms"] is not None]
        tokens = sum(r["tokens"] for r in done)
        busy = sum(r["busy"] for r in results if isinstance(r, dict))
        rate = tokens / wall
        base_rate = base_rate or rate
        base_ttft = base_ttft or percentile(ttfts, 50)
        memory = "".join(f" {rss_mb(pid):.0f} |" for pid in (processes or {}).values())
        print(f"| {n} | {len(done)} | {errors} | {busy} | {percentile(ttfts, 50):.0f} | {(n + 1) / 2 * base_ttft:.0f} "
              f"| {percentile(ttfts, 95):.0f} | {rate:.1f} | {rate / base_rate:.2f} | {wall:.1f} |{memory}")
        for r in results:
            if not isinstance(r, dict):
                print(f"  error: {r!r}")
            elif r["error"]:
                print(f"  error: {r['error']}")


def streams(client, version, prompts, levels, max_tokens, repeats: int = 1) -> None:
    """N model-client streams at once straight to the model server (no web process): the scheduler's
    aggregate decode rate, without retrieval, the groundedness check or long prefills in the way.
    Every stream generates exactly ``max_tokens`` (``ignore_eos``), so levels differ only in N. Each
    level runs ``repeats`` times, levels interleaved (1, 16, 1, 16, ...) so a change in the machine's
    load falls on both; the row gives the run with the median rate."""
    print(f"## Concurrent streams, model client -> model server (a short prompt, {max_tokens} tokens each: decode-bound)\n")
    print("| N | completed | errors | busy replies | TTFT p50 ms | TTFT p95 ms | aggregate tok/s | ratio to N = 1 | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs: dict[int, list] = {n: [] for n in levels}
    for _ in range(max(1, repeats)):
        for n in levels:
            runs[n].append(_streams_once(client, version, prompts, n, max_tokens))
    base = None
    for n in levels:
        done, failed, busy, ttfts, rate, wall = sorted(runs[n], key=lambda run: run[4])[len(runs[n]) // 2]
        base = base or rate
        print(f"| {n} | {done} | {failed} | {busy} | {percentile(ttfts, 50):.0f} "
              f"| {percentile(ttfts, 95):.0f} | {rate:.1f} | {rate / base:.2f} | {wall:.1f} |")
    if repeats > 1:
        print(f"\n(median of {repeats} runs per level; aggregate tok/s of every run: "
              + "; ".join(f"N = {n}: " + ", ".join(f"{run[4]:.0f}" for run in runs[n]) for n in levels) + ")")
    print()


def _streams_once(client, version, prompts, n, max_tokens):
    """One level of ``streams``: ``(completed, errors, busy replies, TTFTs ms, aggregate tok/s, wall s)``."""
    import threading

    from chat.engine import EngineBusy, EngineError

    results = [None] * n

    def one(i):
        busy = 0
        started = time.perf_counter()
        while True:
            try:
                generation = client.submit(prompts[i % len(prompts)], version=version, max_tokens=max_tokens,
                                           ignore_eos=True)
                text = "".join(generation)
                stats = generation.stats
                results[i] = {"tokens": stats.tokens, "busy": busy, "error": None, "text": text,
                              "ttft_ms": (stats.first_token_ms or 0) + (generation.submitted_at - started) * 1000}
                return
            except EngineBusy as error:
                busy += 1
                time.sleep(error.retry_after_s)
            except EngineError as error:
                results[i] = {"tokens": 0, "busy": busy, "error": str(error), "ttft_ms": None}
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for r in results if r and not r["error"]]
    ttfts = [r["ttft_ms"] for r in done]
    rate = sum(r["tokens"] for r in done) / wall
    return len(done), n - len(done), sum(r["busy"] for r in results if r), ttfts, rate, wall


def during_ingestion(client, version, prompts, docs: str, max_tokens: int, repeats: int) -> None:
    """One chat stream (``max_tokens``, ``ignore_eos``) through the model server while nothing else runs,
    and while ``docs`` is being ingested (``manage.py ingest --sync``: the worker's code path, parsing,
    chunking and embedding on torch's threads) at nice 0 and at ``WORKER_NICENESS`` (what Celery
    workers run at, ``config.celery``). Each condition: a warm-up of 20 s for the ingestion to reach
    its embedding, then ``repeats`` streams; the ingestion is then stopped and its collection deleted."""
    from knowledge import services as knowledge_services
    from knowledge.models import Source

    collection = "benchmark-ingestion-load"
    print(f"## One chat stream while {docs} is ingested ({max_tokens} tokens, model client -> model server)\n")
    print("| condition | chat tok/s (median) | runs | ratio to idle | ingestion nice |")
    print("|---|---:|---|---:|---:|")
    base = None
    for label, niceness in (("idle", None), ("during ingestion, worker at nice 0", 0),
                            ("during ingestion, worker at WORKER_NICENESS", settings.WORKER_NICENESS)):
        ingest = None
        if niceness is not None:
            ingest = subprocess.Popen(
                [sys.executable, "manage.py", "ingest", docs, "--collection", collection, "--sync"], cwd=ROOT,
                env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=lambda n=niceness: os.nice(n), start_new_session=True)
            time.sleep(20)
        try:
            rates = []
            for _ in range(max(1, repeats)):
                if ingest is not None and ingest.poll() is not None:
                    break  # the ingestion finished: later runs would measure an idle machine
                rates.append(_streams_once(client, version, prompts, 1, max_tokens)[4])
        finally:
            if ingest is not None:
                os.killpg(ingest.pid, 15)
                ingest.wait()
                knowledge_services.sources_delete(Source.objects.filter(collection=collection))
        rate = statistics.median(rates) if rates else 0.0
        base = base or rate
        print(f"| {label} | {rate:.1f} | {', '.join(f'{r:.0f}' for r in rates)} | {rate / base:.2f} | "
              f"{'' if niceness is None else niceness} |")
    print()


def scheduler_streams(version, levels, max_tokens, threads, slots) -> None:
    """The continuous-batching scheduler in this process (no HTTP, no web): N streams of the short
    prompt, ``max_tokens`` each (``ignore_eos``), aggregate tok/s and its ratio to N = 1, and the
    llama_decode steps taken."""
    import threading

    from chat.batching import BatchedModel, BatchModel
    from chat.engine import Generation

    key = services.model_key(version)  # a stored adapter: this host's cached copy
    print(f"## Scheduler in process (no HTTP): a short prompt, {max_tokens} tokens each, {threads} thread(s), "
          f"kv_unified {settings.LLM_KV_UNIFIED}, flash attention {settings.LLM_FLASH_ATTENTION}\n")
    print("| N | aggregate tok/s | ratio to N = 1 | decode steps | wall s |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for n in levels:
        model = BatchedModel(key, BatchModel(key, slots=max(slots, n), slot_context_tokens=settings.LLM_SLOT_CONTEXT_TOKENS,
                                             batch_tokens=settings.LLM_BATCH_TOKENS, threads=threads,
                                             kv_unified=settings.LLM_KV_UNIFIED,
                                             flash_attention=settings.LLM_FLASH_ATTENTION),
                             queue_size=n)
        warm = Generation(messages=[{"role": "user", "content": "hi"}], options={"max_tokens": 2})
        model.put(warm)
        list(warm)
        steps_before = model.steps
        generations = [Generation(messages=[{"role": "user", "content": SHORT_PROMPT}],
                                  options={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                                           "repeat_penalty": settings.LLM_REPEAT_PENALTY}) for _ in range(n)]
        started = time.perf_counter()
        for generation in generations:
            model.put(generation)
        threads_ = [threading.Thread(target=lambda g=g: list(g)) for g in generations]
        for thread in threads_:
            thread.start()
        for thread in threads_:
            thread.join()
        wall = time.perf_counter() - started
        rate = sum(g.stats.tokens for g in generations) / wall
        base = base or rate
        print(f"| {n} | {rate:.1f} | {rate / base:.2f} | {model.steps - steps_before} | {wall:.1f} |")
        model.retired.set()
        model.thread.join()
    print()


def client_vs_bare(client, version, llama, prompts, repeats, max_tokens) -> None:
    """Single stream: the model client -> model server against bare ``Llama`` on the same prompts,
    alternating which goes first; decode tok/s per run (tokens after the first over the time since)."""
    print(f"## Single stream: model client -> model server vs bare llama-cpp-python (same {len(prompts)} prompts, "
          f"{repeats} runs each, max_tokens={max_tokens})\n")
    bare_rates, served_rates, ratios, same = [], [], [], 0
    for run in range(repeats):
        for messages in prompts:
            order = ("bare", "served") if run % 2 == 0 else ("served", "bare")
            for side in order:
                if side == "bare":
                    bare = bare_run(llama, messages)
                else:
                    generation = client.submit(messages, version=version, max_tokens=max_tokens)
                    text = "".join(generation)
                    served = generation.stats.tokens_per_s
            if bare["tokens_per_s"] and served:
                bare_rates.append(bare["tokens_per_s"])
                served_rates.append(served)
                ratios.append(served / bare["tokens_per_s"])
                same += bare["text"].strip() == text.strip()
    med = statistics.median
    print(f"decode rate, median over {len(ratios)} runs: bare {med(bare_rates):.1f} tok/s, model server "
          f"{med(served_rates):.1f} tok/s; median of paired ratios {med(ratios):.3f}; same text {same}/{len(ratios)}\n")


def start_processes(args) -> dict:
    """Start the model server and the web process (uvicorn) as the production Procfile does; returns
    ``{"model": Popen, "web": Popen, "model_url", "web_url"}``."""
    from tests.live_server import free_port

    model_port, web_port = free_port(), free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
           "LLM_THREADS": str(args.threads), "MODEL_SERVER_SLOTS": str(args.slots)}
    logs = Path(tempfile.mkdtemp(prefix="chat-throughput-"))
    model = subprocess.Popen([sys.executable, "manage.py", "serve_model", "--port", str(model_port)], cwd=ROOT, env=env,
                             stdout=open(logs / "model.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    web_env = {**env, "LLM_SERVER_URL": f"http://127.0.0.1:{model_port}/v1", "DEBUG": "false"}
    if args.always_generate:
        web_env["ANSWER_QUOTE_MIN_RELEVANCE"] = "2"
    web = subprocess.Popen([sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                            "--port", str(web_port), "--workers", str(args.web_workers), "--ws", "websockets-sansio",
                            "--log-level", "warning"], cwd=ROOT, env=web_env,
                           stdout=open(logs / "web.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    for url, process in ((f"http://127.0.0.1:{model_port}/health", model), (f"http://127.0.0.1:{web_port}/healthz", web)):
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{url} did not start; logs in {logs}")
                time.sleep(0.5)
    print(f"(logs in {logs})")
    return {"model": model, "web": web, "model_url": f"http://127.0.0.1:{model_port}/v1",
            "web_url": f"ws://127.0.0.1:{web_port}"}


def stop_processes(processes: dict) -> None:
    for name in ("web", "model"):
        process = processes[name]
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="default")
    parser.add_argument("--prompts", type=int, default=6, help="questions in the same-prompts comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs per question and side")
    parser.add_argument("--levels", default="1,4,16", help="concurrent conversations, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=None, help="override LLM_MAX_TOKENS")
    parser.add_argument("--skip-same-prompts", action="store_true")
    parser.add_argument("--process-model", choices=["server", "inprocess"], default="server")
    parser.add_argument("--threads", type=int, default=settings.LLM_THREADS, help="the model server's LLM_THREADS")
    parser.add_argument("--slots", type=int, default=settings.MODEL_SERVER_SLOTS, help="MODEL_SERVER_SLOTS")
    parser.add_argument("--web-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--always-generate", action=argparse.BooleanOptionalAction, default=True,
                        help="quote-first off in the web process, so the model writes every answer")
    parser.add_argument("--stream-levels", default="1,4,16", help="concurrent model-client streams (server mode)")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream in the streams table")
    parser.add_argument("--stream-repeats", type=int, default=3,
                        help="runs per level in the streams table (levels interleaved; the median run is shown)")
    parser.add_argument("--ingestion-docs", default="",
                        help="a folder (e.g. ../shared/data/doc2dial/docs): also measure one chat stream while "
                             "it is being ingested, at nice 0 and at WORKER_NICENESS")
    parser.add_argument("--scheduler-levels", default="",
                        help="only measure the scheduler in this process at these N (e.g. 1,16), no servers")
    args = parser.parse_args()
    if args.max_tokens:
        settings.LLM_MAX_TOKENS = args.max_tokens
    if args.scheduler_levels:
        version = services.model_version_active()
        return scheduler_streams(version, [int(n) for n in args.scheduler_levels.split(",")], args.stream_tokens,
                                 args.threads, args.slots)
    if args.process_model == "server":
        return main_server(args)

    questions = [q for q in load_questions(args.questions) if q.is_first_turn]
    version = services.model_version_active()
    services.engine_for(version)  # load the served model before timing anything
    chunk_search("warm up", k=1, collection=args.collection)
    print(f"model {version.name} ({Path(version.base_model_path).name}"
          f"{' + ' + Path(version.adapter_path).name if version.adapter_path else ''}), "
          f"threads {settings.LLM_THREADS}, context {settings.LLM_CONTEXT_TOKENS}\n")
    try:
        if not args.skip_same_prompts:
            llama = load_llama(services.model_key(version))
            bare_run(llama, [{"role": "user", "content": "hi"}])  # warm up
            same_prompts(questions, args.collection, args.prompts, llama, args.repeats)
            llama.close()
        concurrent(questions, args.collection, [int(n) for n in args.levels.split(",")])
    finally:
        Conversation.objects.filter(origin="benchmark").delete()



def main_server(args) -> None:
    """The production process model: model server + web process as subprocesses (see the docstring)."""
    global WEB_URL
    from chat.model_client import HttpModelClient

    questions = [q for q in load_questions(args.questions) if q.is_first_turn]
    version = services.model_version_active()
    chunk_search("warm up", k=1, collection=args.collection)
    prompts, answered = [], []
    for question in questions:
        if len(answered) >= max([args.prompts] + [int(n) for n in args.levels.split(",") if n]):
            break
        chunks = chunk_search(retrieval_query(question.question), k=settings.RETRIEVAL_K, collection=args.collection)
        if not services.should_abstain(chunks):
            answered.append(question)
            if len(prompts) < args.prompts:
                prompts.append(grounded_messages(question.question, chunks[: settings.LLM_PROMPT_SOURCES],
                                                 max_chars=settings.LLM_SOURCE_MAX_CHARS))
    questions = answered  # the concurrent conversations ask questions the pipeline answers (not abstained)
    processes = start_processes(args)
    WEB_URL = processes["web_url"]
    client = HttpModelClient(processes["model_url"], timeout_s=600)
    print(f"model {version.name} ({Path(version.base_model_path).name}), model server: threads {args.threads}, "
          f"slots {args.slots}, batch {settings.LLM_BATCH_TOKENS} tokens, prefill chunk {settings.LLM_PREFILL_CHUNK}; "
          f"web: uvicorn x {args.web_workers}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    try:
        "".join(client.submit([{"role": "user", "content": "hi"}], version=version, max_tokens=4))  # warm up
        if not args.skip_same_prompts:
            from llama_cpp import Llama

            from chat.llama_buffers import llama_loading

            key = services.model_key(version)  # a stored adapter: this host's cached copy
            with llama_loading():
                llama = Llama(model_path=key.base_model_path, lora_path=key.adapter_path or None,
                              n_ctx=settings.LLM_CONTEXT_TOKENS, n_threads=args.threads, n_threads_batch=args.threads,
                              seed=0, verbose=False)
            bare_run(llama, [{"role": "user", "content": "hi"}])
            client_vs_bare(client, version, llama, prompts, args.repeats, settings.LLM_MAX_TOKENS)
            llama.close()
        warm = asyncio.run(ask(questions[0].question, args.collection))  # the web process loads its embedding model
        if warm["error"]:
            raise SystemExit(f"the web process failed to answer: {warm['error']}")
        streams(client, version, [[{"role": "user", "content": SHORT_PROMPT}]],
                [int(n) for n in args.stream_levels.split(",") if n], args.stream_tokens, args.stream_repeats)
        concurrent(questions, args.collection, [int(n) for n in args.levels.split(",") if n],
                   processes={"web": processes["web"].pid, "model server": processes["model"].pid})
        if args.ingestion_docs:
            during_ingestion(client, version, [[{"role": "user", "content": SHORT_PROMPT}]], args.ingestion_docs,
                             args.stream_tokens, args.stream_repeats)
    finally:
        client.close()
        stop_processes(processes)
        Conversation.objects.filter(origin="benchmark").delete()


if __name__ == "__main__":
    main()
