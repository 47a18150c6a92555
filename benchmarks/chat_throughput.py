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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
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
from chat.engine import load_llama, ModelKey  # noqa: E402
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


async def ask(question: str, collection: str) -> dict:
    """Ask ``question`` in a new conversation over the websocket; retries ``chat.busy`` replies.

    Returns ``{"ttft_ms", "tokens", "client_tokens_per_s", "server", "busy", "error", "text"}``.
    """
    conversation = await sync_to_async(services.conversation_start)(collection=collection, origin="benchmark")
    communicator = WebsocketCommunicator(application, f"/ws/chat/{conversation.pk}/",
                                         subprotocols=client_subprotocols(conversation.token))
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


def concurrent(questions, collection, levels) -> None:
    print("## Concurrent websocket conversations\n")
    print(f"(engine queue LLM_QUEUE_SIZE={settings.LLM_QUEUE_SIZE}; busy replies are retried after retry_after_s)\n")
    print("| N | completed | errors | busy replies | TTFT p50 ms | TTFT p95 ms | aggregate tok/s | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
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
        print(f"| {n} | {len(done)} | {errors} | {busy} | {percentile(ttfts, 50):.0f} | {percentile(ttfts, 95):.0f} "
              f"| {tokens / wall:.1f} | {wall:.1f} |")
        for r in results:
            if not isinstance(r, dict):
                print(f"  error: {r!r}")
            elif r["error"]:
                print(f"  error: {r['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="default")
    parser.add_argument("--prompts", type=int, default=6, help="questions in the same-prompts comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs per question and side")
    parser.add_argument("--levels", default="1,4,16", help="concurrent conversations, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=None, help="override LLM_MAX_TOKENS")
    parser.add_argument("--skip-same-prompts", action="store_true")
    args = parser.parse_args()
    if args.max_tokens:
        settings.LLM_MAX_TOKENS = args.max_tokens

    questions = [q for q in load_questions(args.questions) if q.is_first_turn]
    version = services.model_version_active()
    services.engine_for(version)  # load the served model before timing anything
    chunk_search("warm up", k=1, collection=args.collection)
    print(f"model {version.name} ({Path(version.base_model_path).name}"
          f"{' + ' + Path(version.adapter_path).name if version.adapter_path else ''}), "
          f"threads {settings.LLM_THREADS}, context {settings.LLM_CONTEXT_TOKENS}\n")
    try:
        if not args.skip_same_prompts:
            llama = load_llama(ModelKey(version.base_model_path, version.adapter_path))
            bare_run(llama, [{"role": "user", "content": "hi"}])  # warm up
            same_prompts(questions, args.collection, args.prompts, llama, args.repeats)
            llama.close()
        concurrent(questions, args.collection, [int(n) for n in args.levels.split(",")])
    finally:
        Conversation.objects.filter(origin="benchmark").delete()


if __name__ == "__main__":
    main()
