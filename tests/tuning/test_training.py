"""LoRA training on the base GGUF (``tuning.training``), with a tiny llama GGUF made in the test: the
chat-template encoding and its loss mask, the training loop (loss goes down, deterministic, progress,
abort) and what it leaves frozen."""

from __future__ import annotations

import pytest
import torch

from tuning.training import (
    ATTENTION_PROJECTIONS,
    IGNORE_INDEX,
    MLP_PROJECTIONS,
    LoraHyperparameters,
    TrainingStopped,
    encode_chat_record,
    gguf_chat_template,
    lora_train,
)

FAST = dict(r=8, alpha=16.0, dropout=0.0, learning_rate=1e-2, batch_size=3, seed=0)


def test_load_base_model_gives_float32_llama_with_tied_output_and_the_gguf_chat_template(tiny_gguf, tiny_base):
    # Given the tiny GGUF (hidden 64, 2 layers, 4 heads, 2 kv heads) loaded by load_base_model
    model, tokenizer = tiny_base

    # Then the config is the GGUF's, the weights are float32 on the CPU and the output layer is tied
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (64, 2, 4, 2, 128, 49152)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert next(model.parameters()).device.type == "cpu"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # and the tokenizer carries the GGUF's chat template (SmolLM2's ChatML)
    assert tokenizer.chat_template == gguf_chat_template(tiny_gguf)
    assert tokenizer.chat_template.startswith("{% for message in messages %}")


def test_encode_chat_record_masks_everything_but_the_final_assistant_turn(tiny_base, tiny_records):
    # Given a record with a system turn, a question and the answer to learn
    _, tokenizer = tiny_base
    record = tiny_records[2]

    # When it is encoded
    encoded = encode_chat_record(tokenizer, record, max_tokens=512)

    # Then the prompt is exactly what the served model sees before answering
    prompt = tokenizer.decode(encoded.input_ids[:encoded.prompt_tokens])
    assert prompt == ("<|im_start|>system\nSources: [1] Student aid: apply with the FAFSA form.<|im_end|>\n"
                      "<|im_start|>user\nHow do I apply for aid?<|im_end|>\n<|im_start|>assistant\n")
    # and only the answer, with its end-of-turn token, is labelled
    assert encoded.labels[:encoded.prompt_tokens] == [IGNORE_INDEX] * encoded.prompt_tokens
    answer_ids = encoded.input_ids[encoded.prompt_tokens:]
    assert encoded.labels[encoded.prompt_tokens:] == answer_ids
    assert tokenizer.decode(answer_ids) == "Fill out the FAFSA form [1].<|im_end|>"
    assert len(encoded.input_ids) == encoded.prompt_tokens + encoded.answer_tokens
    assert encoded.truncated is False


def test_encode_chat_record_truncates_the_prompt_from_its_start_and_keeps_the_answer(tiny_base, tiny_records):
    # Given a record longer than the token budget
    _, tokenizer = tiny_base
    full = encode_chat_record(tokenizer, tiny_records[2], max_tokens=512)
    budget = 2 * full.answer_tokens + 2
    assert full.prompt_tokens > full.answer_tokens + 2

    # When it is encoded with that budget
    cut = encode_chat_record(tokenizer, tiny_records[2], max_tokens=budget)

    # Then the answer is whole and the prompt keeps its last tokens (ending with the assistant header)
    assert cut.truncated is True
    assert (len(cut.input_ids), cut.prompt_tokens) == (budget, full.answer_tokens + 2)
    assert cut.input_ids[cut.prompt_tokens:] == full.input_ids[full.prompt_tokens:]
    assert cut.input_ids[:cut.prompt_tokens] == full.input_ids[full.prompt_tokens - cut.prompt_tokens:full.prompt_tokens]
    assert tokenizer.decode(cut.input_ids[:cut.prompt_tokens]).endswith("<|im_start|>assistant\n")


def test_encode_chat_record_cuts_an_answer_longer_than_the_budget_at_its_end(tiny_base, tiny_records):
    # Given a budget smaller than the answer alone
    _, tokenizer = tiny_base
    full = encode_chat_record(tokenizer, tiny_records[0], max_tokens=512)

    # When encoded in 8 tokens
    cut = encode_chat_record(tokenizer, tiny_records[0], max_tokens=8)

    # Then half goes to the end of the prompt, half to the start of the answer
    assert full.prompt_tokens > 8 and full.answer_tokens > 4
    assert (cut.prompt_tokens, cut.answer_tokens, cut.truncated) == (4, 4, True)
    assert cut.input_ids == (full.input_ids[full.prompt_tokens - 4:full.prompt_tokens]
                             + full.input_ids[full.prompt_tokens:full.prompt_tokens + 4])


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "user", "content": "Only a question"}],
    [{"role": "assistant", "content": "An answer"}, {"role": "user", "content": "then a question"}],
])
def test_encode_chat_record_rejects_a_record_not_ending_with_the_answer(tiny_base, messages):
    with pytest.raises(ValueError, match="last message must be the assistant's answer"):
        encode_chat_record(tiny_base[1], {"messages": messages}, max_tokens=64)


def test_lora_train_lowers_the_loss_reports_progress_and_trains_only_lora(tiny_base, tiny_model, tiny_records):
    # Given the tiny model, three records and a high learning rate
    _, tokenizer = tiny_base
    frozen_before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    progress = []

    # When it trains 10 epochs of one batch each
    result = lora_train(tiny_model, tokenizer, tiny_records, LoraHyperparameters(epochs=10, **FAST),
                        on_progress=lambda step, total, loss: progress.append((step, total, loss)))

    # Then the loss went down steadily, a step per batch, reported as it went
    losses = [point["loss"] for point in result.loss_curve]
    assert [point["step"] for point in result.loss_curve] == list(range(1, 11))
    assert [point["epoch"] for point in result.loss_curve] == [float(n) for n in range(1, 11)]
    assert losses[-1] < 0.7 * losses[0]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert progress == [(step, 10, loss) for step, loss in enumerate(losses, start=1)]
    # and the counts describe the data set
    encoded = [encode_chat_record(tokenizer, record, max_tokens=1024) for record in tiny_records]
    assert (result.examples, result.epochs, result.steps, result.truncated) == (3, 10, 10, 0)
    assert result.tokens == sum(len(item.input_ids) for item in encoded)
    assert result.answer_tokens == sum(item.answer_tokens for item in encoded)
    assert result.duration_s > 0
    # and only the LoRA matrices of the projections trained (all of them by default): base weights,
    # the tied embeddings and the output layer are unchanged
    peft_model = result.peft_model
    trained = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trained} == set(ATTENTION_PROJECTIONS + MLP_PROJECTIONS)
    assert len(trained) == 2 * 7 * 2  # A and B x 7 projections x 2 blocks
    base_after = {name.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
                  for name, p in peft_model.named_parameters() if ".lora_" not in name}
    assert base_after.keys() == frozen_before.keys()
    assert all(torch.equal(base_after[name], frozen_before[name]) for name in frozen_before)
    assert peft_model.training is False


def test_lora_train_is_deterministic_for_a_seed(tiny_base, tiny_records):
    # Given two fresh copies of the model and the same seed
    import copy

    model, tokenizer = tiny_base
    hp = LoraHyperparameters(epochs=3, batch_size=2, **{k: v for k, v in FAST.items() if k != "batch_size"})

    # When both train
    first = lora_train(copy.deepcopy(model), tokenizer, tiny_records, hp)
    second = lora_train(copy.deepcopy(model), tokenizer, tiny_records, hp)

    # Then loss curves and LoRA weights are identical
    assert first.loss_curve == second.loss_curve
    assert len(first.loss_curve) == 6  # 2 batches (2 + 1 records) x 3 epochs
    weights = [{n: p for n, p in r.peft_model.named_parameters() if ".lora_" in n} for r in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_micro_batches_accumulate_to_the_same_step_as_one_batch(tiny_base, tiny_records):
    # Given the same training run with one record per pass and with the whole batch in one pass
    import copy

    model, tokenizer = tiny_base
    runs = [lora_train(copy.deepcopy(model), tokenizer, tiny_records,
                       LoraHyperparameters(epochs=2, micro_batch_size=micro, **FAST)) for micro in (1, 3)]

    # Then the losses agree to float rounding (padding and accumulation do not change the math)
    for one, whole in zip(runs[0].loss_curve, runs[1].loss_curve):
        assert one["loss"] == pytest.approx(whole["loss"], rel=1e-4)


def test_should_stop_aborts_training_between_steps(tiny_base, tiny_model, tiny_records):
    # Given a stop request after two steps
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    progress = []
    # When training runs, then it stops before the third step
    with pytest.raises(TrainingStopped) as stopped:
        lora_train(tiny_model, tiny_base[1], tiny_records, LoraHyperparameters(epochs=5, **FAST),
                   on_progress=lambda step, total, loss: progress.append(step), should_stop=should_stop)
    assert (stopped.value.steps_done, stopped.value.total_steps) == (2, 5)
    assert str(stopped.value) == "training stopped after 2 of 5 steps"
    assert progress == [1, 2]


def test_lora_train_rejects_no_records(tiny_base, tiny_model):
    with pytest.raises(ValueError, match="no training records"):
        lora_train(tiny_model, tiny_base[1], [], LoraHyperparameters())


@pytest.mark.parametrize("change", [{"target_modules": ("q_proj", "lm_head")}, {"target_modules": ()},
                                    {"r": 0}, {"batch_size": 0}, {"micro_batch_size": 0}])
def test_hyperparameters_reject_tied_layers_and_nonsense(change):
    with pytest.raises(ValueError):
        LoraHyperparameters(**change)


def test_hyperparameters_round_trip_through_json_form():
    # Given hyper-parameters stored as JSON on a run (lists, not tuples)
    hp = LoraHyperparameters(target_modules=("q_proj", "v_proj"), seed=3)

    # Then they rebuild equal
    assert LoraHyperparameters(**hp.as_dict()) == hp
    assert hp.as_dict()["target_modules"] == ["q_proj", "v_proj"]
