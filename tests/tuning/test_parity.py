"""Parity between llama-cpp-python (base + exported LoRA adapter GGUF) and transformers + peft
(``tuning.parity``): a correct export passes, one without the q/k rotary permutation fails; and, on the
real SmolLM2 (slow), a fine-tune on a few Doc2Dial examples changes what llama-cpp-python says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chat.llama_buffers import llama_loading
from tuning.gguf_lora import lora_adapter_export
from tuning.parity import DEFAULT_THRESHOLDS, ParityThresholds, RuntimeComparison, adapter_parity_check, parity_failures
from tuning.training import LoraHyperparameters, encode_chat_record, load_base_model, lora_train


def positions(tokenizer, records) -> tuple[int, int]:
    """(all compared positions, answer positions) of ``records``."""
    encoded = [encode_chat_record(tokenizer, record, max_tokens=1024) for record in records]
    return sum(len(item.input_ids) - 1 for item in encoded), sum(item.answer_tokens for item in encoded)


def test_a_correct_export_passes_as_closely_as_the_two_base_runtimes_agree(tiny_gguf, tiny_base, tiny_trained,
                                                                          tiny_records, tmp_path):
    # Given the trained tiny LoRA exported with the q/k permutation
    _, tokenizer = tiny_base
    adapter = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf")

    # When parity is checked on the training records
    report = adapter_parity_check(tiny_gguf, adapter, tiny_trained.peft_model, tokenizer, tiny_records)

    # Then it passes: every position compared, the runtimes agree on every top token and the
    # float32 model's distributions are equal to rounding, with and without the adapter
    assert (report.passed, report.reason, report.prompts) == (True, "", 3)
    every, answers = positions(tokenizer, tiny_records)
    for comparison in (report.base, report.adapter):
        assert (comparison.positions, comparison.answer_positions) == (every, answers)
        assert comparison.top1_agreement == comparison.answer_top1_agreement == 1.0
        assert comparison.mean_kl_nats < 1e-5 and comparison.answer_mean_kl_nats < 1e-5
        assert comparison.loglik_llama == pytest.approx(comparison.loglik_torch, abs=1e-3)
    # and the adapter really changed the model (so the check could tell a broken export apart)
    assert report.adapter_shift_kl_nats > 1.0
    assert report.adapter.loglik_torch > report.base.loglik_torch + 3.0
    assert report.thresholds == DEFAULT_THRESHOLDS
    assert json.loads(json.dumps(report.as_dict()))["adapter"]["positions"] == every


def test_an_export_without_the_q_k_permutation_loads_but_fails_parity(tiny_gguf, tiny_base, tiny_trained,
                                                                     tiny_records, tmp_path):
    # Given the same LoRA exported without the rotary permutation of q/k lora_b
    _, tokenizer = tiny_base
    adapter = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "raw.gguf", _permute_qk=False)

    # When parity is checked
    report = adapter_parity_check(tiny_gguf, adapter, tiny_trained.peft_model, tokenizer, tiny_records)

    # Then the base runtimes still agree, but the adapter's KL is orders of magnitude above theirs
    assert report.passed is False
    assert report.base.top1_agreement == 1.0
    assert report.adapter.mean_kl_nats > 0.1 > 1e4 * report.base.mean_kl_nats
    assert report.adapter.top1_agreement < 0.9 and report.adapter.answer_top1_agreement < 0.9
    assert report.reason.startswith("adapter KL ")
    assert "top-1 agreement" in report.reason and "log-likelihood" in report.reason


def test_parity_failures_are_relative_to_the_base_runtimes():
    # Given base runtimes that agree on 96 % of tokens with a KL of 0.01 nats
    base = RuntimeComparison(positions=100, top1_agreement=0.96, mean_kl_nats=0.01, mean_abs_loglik_diff_nats=0.05)
    thresholds = ParityThresholds(kl_ratio=2.0, kl_epsilon_nats=0.001, top1_margin=0.03, loglik_ratio=2.0,
                                  loglik_epsilon_nats=0.005)

    # Then an adapter as close passes, and each bound fails on its own just past its limit
    close = RuntimeComparison(positions=100, top1_agreement=0.93, mean_kl_nats=0.021, mean_abs_loglik_diff_nats=0.105)
    assert parity_failures(base, close, thresholds) == []
    far = RuntimeComparison(positions=100, top1_agreement=0.92, mean_kl_nats=0.0211, mean_abs_loglik_diff_nats=0.106)
    assert parity_failures(base, far, thresholds) == [
        "adapter KL 0.0211 nats > 0.0210 (2 x base KL 0.0100 + 0.001)",
        "adapter top-1 agreement 0.920 < 0.930 (base 0.960 - 0.03)",
        "adapter answer log-likelihood differs by 0.1060 nats/token > 0.1050 (2 x base 0.0500 + 0.005)",
    ]


def test_parity_check_needs_both_files_and_some_prompts(tiny_gguf, tiny_base, tiny_trained, tmp_path):
    _, tokenizer = tiny_base
    with pytest.raises(FileNotFoundError):
        adapter_parity_check(tiny_gguf, tmp_path / "missing.gguf", tiny_trained.peft_model, tokenizer, [{}])
    adapter = lora_adapter_export(tiny_trained.peft_model, tiny_gguf, tmp_path / "adapter.gguf")
    with pytest.raises(ValueError, match="no prompts"):
        adapter_parity_check(tiny_gguf, adapter, tiny_trained.peft_model, tokenizer, [])


# --- The real base model -------------------------------------------------------------------------------

INSTRUCTION = "Answer the question in one or two sentences using only the sources. Cite the source number like [1]."


def doc2dial_records(doc2dial_questions, doc2dial_dir: Path, count: int) -> list[dict]:
    """Grounded records from the first ``count`` first-turn questions of distinct dialogues with a
    40..300-character reference answer: the gold page around the answer as source [1], the reference
    passage plus " [1]" as the answer."""
    records, seen = [], set()
    for row in doc2dial_questions:
        answer = " ".join(row["reference_answer"].split())
        if not row["is_first_turn"] or row["dial_id"] in seen or not 40 <= len(answer) <= 300:
            continue
        text = (doc2dial_dir / row["gold_file"]).read_text(encoding="utf-8")
        excerpt = " ".join(text[max(0, row["answer_start"] - 300):row["answer_end"] + 300].split())
        content = f"Sources:\n[1] {excerpt}\n\nQuestion: {row['question'].strip()}\n{INSTRUCTION}"
        records.append({"messages": [{"role": "user", "content": content},
                                     {"role": "assistant", "content": f"{answer} [1]"}]})
        seen.add(row["dial_id"])
        if len(records) == count:
            return records
    return records


@pytest.fixture
def one_thread():
    """torch and llama.cpp on one thread for this test (torch's count restored after). On 2 cores
    shared with other busy jobs, 2 threads that wait for each other made this test 3-4x slower
    (9.5 min instead of under 3)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_real_smollm2_fine_tune_changes_llama_cpp_output_and_passes_parity(smollm2_gguf, doc2dial_dir,
                                                                          doc2dial_questions, one_thread, tmp_path):
    """About 3 minutes on one core: load ~25 s, 6 examples x 3 epochs at ~2.8 s per example pass,
    two parity checks on 3 prompts (~30 s each), greedy answers."""
    import llama_cpp

    threads = one_thread
    # Given the real SmolLM2 and 6 grounded Doc2Dial examples
    model, tokenizer = load_base_model(smollm2_gguf)
    records = doc2dial_records(doc2dial_questions, doc2dial_dir, 6)
    assert len(records) == 6

    # When a LoRA is trained briefly on them and exported
    result = lora_train(model, tokenizer, records, LoraHyperparameters(learning_rate=1e-3, epochs=3, batch_size=3))
    adapter = lora_adapter_export(result.peft_model, smollm2_gguf, tmp_path / "adapter.gguf")
    assert len(result.loss_curve) == 6
    assert result.loss_curve[-1]["loss"] < 0.6 * result.loss_curve[0]["loss"]

    # Then parity holds: llama.cpp + adapter matches peft about as closely as the base runtimes agree
    prompts = records[:3]
    report = adapter_parity_check(smollm2_gguf, adapter, result.peft_model, tokenizer, prompts, n_threads=threads)
    assert report.passed, report.reason
    assert report.base.top1_agreement >= 0.95 and report.adapter.top1_agreement >= 0.95
    # and in llama-cpp-python the reference answers became much more likely
    assert report.adapter.loglik_llama > report.base.loglik_llama + 0.2

    # and a broken export (no q/k permutation) is caught on the same prompts
    broken = lora_adapter_export(result.peft_model, smollm2_gguf, tmp_path / "broken.gguf", _permute_qk=False)
    broken_report = adapter_parity_check(smollm2_gguf, broken, result.peft_model, tokenizer, prompts, n_threads=threads)
    assert broken_report.passed is False
    assert broken_report.reason.startswith("adapter KL ")
    assert broken_report.adapter.mean_kl_nats > 2 * report.adapter.mean_kl_nats

    # and the greedy answer text changed on a trained question
    answers = []
    for lora in (None, str(adapter)):
        with llama_loading():
            llm = llama_cpp.Llama(model_path=str(smollm2_gguf), lora_path=lora, n_ctx=1024, n_threads=threads,
                                  n_threads_batch=threads, seed=0, verbose=False)
        try:
            answers.append([llm.create_chat_completion(r["messages"][:-1], max_tokens=24, temperature=0.0)
                            ["choices"][0]["message"]["content"] for r in records[:2]])
        finally:
            llm.close()
    assert answers[0] != answers[1]
