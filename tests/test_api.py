"""The public preview (`prepare_dataset`) and the dry run: what training will see, without a model."""

import pytest

import training_hub
from training_hub import lora_sft, prepare_dataset
from training_hub.data import format_example

CHAT = [{"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Greet Alice."},
    {"role": "assistant", "content": "Hello, Alice!"},
    {"role": "user", "content": "And Bob?"},
    {"role": "assistant", "content": "Hello, Bob!"},
]}]


def supervised_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


def test_prepare_dataset_trains_on_both_answers_and_their_end_of_turn_only(tiny_model_factory):
    from transformers import AutoTokenizer

    model_path = tiny_model_factory("qwen2", "chatml")
    prepared = prepare_dataset(CHAT, model_path=str(model_path), max_seq_len=256, data_output_dir="none")
    row = prepared.dataset[0]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert supervised_text(tokenizer, row) == "Hello, Alice!<|im_end|>Hello, Bob!<|im_end|>"
    shown = format_example(row["input_ids"], row["labels"], tokenizer)
    assert "[[Hello, Alice!<|im_end|>]]" in shown and "[[Hello, Bob!<|im_end|>]]" in shown
    assert prepared.summary.rows_out == 1

    everything = prepare_dataset(CHAT, model_path=str(model_path), max_seq_len=256, train_on_inputs=True,
                                 data_output_dir="none").dataset[0]
    assert everything["labels"] == everything["input_ids"]


def test_prepare_dataset_needs_one_tokenizer_source():
    with pytest.raises(ValueError, match="exactly one of model_path= or tokenizer="):
        prepare_dataset(CHAT)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_factory, greeting_jsonl, tmp_path):
    out = tmp_path / "out"
    result = lora_sft(str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(out), backend="peft",
                      dry_run=True, effective_batch_size=8, data_output_dir="none")
    assert result.model is None and result.plan["micro_batch_size"] * result.plan["gradient_accumulation_steps"] == 8
    assert result.data_summary["rows_out"] == 48
    assert not out.exists()


def test_resumed_throughput_counts_only_this_sessions_tokens():
    from types import SimpleNamespace

    from training_hub.training import final_metrics as _final_metrics

    state = SimpleNamespace(num_input_tokens_seen=1000, global_step=10)
    plan = SimpleNamespace(flops_per_token=None, peak_tflops=None, device="cpu")
    metrics = _final_metrics({"train_runtime": 2.0}, state, plan, tokens_before=600)
    assert metrics["num_tokens"] == 1000 and metrics["tokens_per_second"] == 200.0


def test_load_returns_the_peft_model_and_the_tokenizer_of_a_text_run(surface_run):
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    model, tokenizer = training_hub.load(surface_run["out"])
    assert isinstance(model, PeftModel) and isinstance(tokenizer, PreTrainedTokenizerBase)
    assert type(model.get_base_model()).__name__ == "Qwen2ForCausalLM" and not model.training
