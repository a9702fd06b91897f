"""An OpenAI-format tool-calling .jsonl (tools, tool_calls, tool results, a weight-0 turn) trains end to end with
no dataset_type; a malformed call fails before anything is written."""

from __future__ import annotations

import copy
import shutil

import pytest

from sample_data import NAMES, write_jsonl
from jobs import losses, train
from tool_templates import HERMES_TEMPLATE, TOOL_CHAT

from training_hub import lora_sft, prepare_dataset
from training_hub.data import DataError

pytestmark = pytest.mark.slow


def tool_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        row = copy.deepcopy(TOOL_CHAT)
        row["messages"][1]["content"] = f"Weather in Paris and Rome, {NAMES[i % len(NAMES)]} asks?"
        rows.append(row)
    return rows


@pytest.fixture
def tool_model(tiny_model_factory, tmp_path):
    """The tiny Qwen2 model with a Hermes-style tool-calling chat template."""
    from transformers import AutoTokenizer

    model = tmp_path / "tool-model"
    shutil.copytree(tiny_model_factory("qwen2", "chatml"), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = HERMES_TEMPLATE
    tokenizer.save_pretrained(model)
    return model


def test_openai_tool_calling_jsonl_trains_without_dataset_type(tool_model, tmp_path):
    data = write_jsonl(tmp_path / "agent.jsonl", tool_rows())
    prepared = prepare_dataset(str(data), model_path=str(tool_model), data_output_dir="none")
    assert len(prepared) == 16
    first = prepared[0]
    supervised = [t for t, label in zip(first["input_ids"], first["labels"]) if label != -100]
    assert prepared.summary.supervised_tokens_total == 16 * len(supervised)
    out = tmp_path / "out"
    summary = train(model_path=str(tool_model), data_path=str(data), ckpt_output_dir=str(out), backend="peft",
                    max_steps=3, logging_steps=1, save_steps=1000, warmup_steps=0, data_output_dir="none")
    assert summary["data_summary"]["format"] == "messages" and summary["data_summary"]["rows_out"] == 16
    assert summary["data_summary"]["supervised_tokens_total"] == prepared.summary.supervised_tokens_total
    assert len(losses(out)) == 3 and (out / "adapter_model.safetensors").exists()


def test_malformed_tool_call_fails_before_anything_is_written(tool_model, tmp_path):
    rows = tool_rows(4)
    rows[2]["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    data = write_jsonl(tmp_path / "agent.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"agent.jsonl:3: messages\[2\].tool_calls\[0\].function.arguments is not "
                                        "valid JSON"):
        lora_sft(str(tool_model), str(data), str(out), backend="peft")
    assert not out.exists()
